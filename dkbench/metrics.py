"""One FLOP model for every provider: 4 * head_dim per computed (query, key) pair forward.

A provider is credited with the pairs it computes: the pattern's kept pairs for a sparse kernel,
every (causal) pair for a dense one. Dense-equivalent TFLOP/s divides the dense problem's FLOPs
by the same time, the rate a dense kernel would need to match.
"""

from __future__ import annotations

from kernels import BlockLayout
from kernels.layout import causal_pairs, kept_pairs

from .spec import Case

MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}

# Dense tensor-core peaks in TFLOP/s (fp16/bf16; fp32 runs as tf32 at half that) by GPU name.
PEAK_TFLOPS = {"H100": 989.5, "H200": 989.5, "H800": 989.5, "GH200": 989.5, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2}


def dense_pairs(case: Case) -> float:
    return float(causal_pairs(case.q_len, case.seqlen) if case.causal else case.q_len * case.seqlen)


def pattern_pairs(case: Case, layout: BlockLayout) -> float:
    return kept_pairs(layout, case.seqlen, case.q_len)


def flops(case: Case, pairs: float) -> float:
    return 4.0 * case.head_dim * pairs * case.batch * case.heads * MODE_FACTOR[case.mode]


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12


def peak_tflops(gpu: str, dtype: str) -> float | None:
    """The GPU's dense peak for this dtype, or None for a GPU not in the table."""
    for name, peak in PEAK_TFLOPS.items():
        if name in gpu:
            return peak / 2 if dtype == "float32" else peak
    return None
