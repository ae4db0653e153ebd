"""The CI regression gate on throughput."""
