"""Results: the one schema of results.csv and meta.json, run directories read back, shards merged."""
