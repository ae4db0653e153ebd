"""A cache key and a config for the cache tests of both packages."""

from __future__ import annotations

from kernels.config_cache import CacheKey

CONFIG = {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3}


def make_key(**overrides: object) -> CacheKey:
    """An H100 forward key for phi-3's 8k shape, with any field replaced."""
    fields = dict(
        gpu="NVIDIA H100 80GB HBM3", capability="9.0", triton="3.6.0", kernel="fwd",
        kernel_hash="ab12cd34", dtype="bfloat16", head_dim=128, block_size=64,
        seqlen_bucket=8192, density_bucket=0.35,
    )
    fields.update(overrides)
    return CacheKey(**fields)  # type: ignore[arg-type]
