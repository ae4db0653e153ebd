"""Sweep specs: YAML in, validated `Sweep` and frozen `Case`s out (`load.load_spec`)."""
