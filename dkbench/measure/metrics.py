"""One FLOP model for every provider: 4 * head_dim per computed (query, key) pair forward.

A provider is credited with the pairs it computes: the pattern's kept pairs for a sparse kernel,
every (causal) pair of the (padded) problem for a dense one. Dense-equivalent TFLOP/s divides the dense problem's FLOPs
by the same time, the rate a dense kernel would need to match.
"""

from __future__ import annotations

from kernels import BlockLayout, causal_pairs, kept_pairs

from ..spec.sweep import FP8, TRAINING_MODES, Case
from .modes import sequence_lengths

MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5, "prefill_varlen": 1.0, "decode": 1.0}

# Dense tensor-core peaks in TFLOP/s (fp16/bf16; fp32 runs as tf32 at half that) by GPU name.
PEAK_TFLOPS = {"H100": 989.5, "H200": 989.5, "H800": 989.5, "GH200": 989.5, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2}


def dense_pairs(case: Case) -> float:
    """Pairs per head and sequence of the dense (causal) problem without padding: the least a
    dense kernel computes; dense-equivalent TFLOP/s divide these FLOPs by the measured time."""
    if case.mode in TRAINING_MODES:
        return float(causal_pairs(case.q_len, case.seqlen) if case.causal
                     else case.q_len * case.seqlen)
    lengths = sequence_lengths(case)
    if case.mode == "decode":
        return sum(lengths) / case.batch
    return sum(causal_pairs(n, n) if case.causal else n * n for n in lengths) / case.batch


def pattern_pairs(case: Case, layout: BlockLayout) -> float:
    """Pairs per head and sequence the pattern keeps (each sequence's pattern from its start)."""
    if case.mode in TRAINING_MODES:
        return kept_pairs(layout, case.seqlen, case.q_len)
    lengths = sequence_lengths(case)
    q_len = (lambda n: 1) if case.mode == "decode" else (lambda n: n)
    return sum(kept_pairs(layout, n, q_len(n)) for n in lengths) / case.batch


def padded_dense_pairs(case: Case) -> float:
    """Pairs per head and sequence a dense baseline computes on right-padded inputs."""
    if case.mode == "decode":
        return float(case.seqlen)  # a masked dense kernel reads the whole padded cache
    if case.mode == "prefill_varlen":
        return float(causal_pairs(case.seqlen, case.seqlen) if case.causal else case.seqlen ** 2)
    return dense_pairs(case)


def computed_pairs(case: Case, layout: BlockLayout, computes: str, padded: bool = False) -> float:
    """The pairs a provider computes: its pattern's for a sparse kernel, the dense problem's for
    a dense one (with the padding, for one that runs on right-padded inputs)."""
    if computes == "pattern":
        return pattern_pairs(case, layout)
    return padded_dense_pairs(case) if padded else dense_pairs(case)


def flops(case: Case, pairs: float) -> float:
    return 4.0 * case.head_dim * pairs * case.batch * case.heads * MODE_FACTOR[case.mode]


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12


def peak_tflops(gpu: str, dtype: str) -> float | None:
    """The GPU's dense peak for this dtype, or None for a GPU not in the table (fp8 runs at
    twice the 16-bit rate)."""
    for name, peak in PEAK_TFLOPS.items():
        if name in gpu:
            return peak / 2 if dtype == "float32" else peak * 2 if dtype == FP8 else peak
    return None
