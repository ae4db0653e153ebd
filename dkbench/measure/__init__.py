"""Measuring: providers, inputs and checks, timing, the runner that writes one row per case x provider."""
