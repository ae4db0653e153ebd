"""`dkbench tune`: the search space, the tuner, and the harness side of the config cache."""
