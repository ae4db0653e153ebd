"""dkbench: benchmark and autotune block-sparse attention written in Triton."""

__version__ = "0.1.0"
