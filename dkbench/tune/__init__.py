"""`dkbench tune`: what to tune (plan, space), its candidates measured by the runner (tuner, with
the compile phase in precompile), tune.csv (rows), the winners, and the harness side of the cache."""
