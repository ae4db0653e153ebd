"""Will a case fit, and how long will the interpreter take? Estimates made before anything runs.

The runner asks `too_big` before preparing a case x provider and marks one that cannot fit
``oom`` without attempting it (a CPU that swaps or an OOM-killed process is worse than a row);
`dkbench run` prints `cpu_warning` before a sweep that would keep Triton's interpreter busy for
minutes. Both are estimates from the shapes alone: the memory is a lower bound (the tensors a case
must hold, not a provider's workspace), so a case refused here could never have run.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

from ..names import BUNDLED_PROVIDER
from ..spec.sweep import FP8, TRAINING_MODES, Case

GIB = 2**30
REFERENCE = "reference"  # the check's dense reference, estimated as if it were a provider
# Providers that materialise the (batch, heads, q_len, seqlen) score matrix in fp32.
SCORE_PROVIDERS = frozenset({"sdpa_math", REFERENCE})
SCORE_BYTES = 4
GRAD_MODES = ("bwd", "fwd_bwd")
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

# Triton's interpreter on a CPU: about 3 s for a causal forward over 1,000 tokens of one head of
# head_dim 64 with 32-row tiles; the work grows with the pairs computed times heads times head_dim.
INTERPRETED = frozenset({BUNDLED_PROVIDER})  # providers that run the bundled Triton kernel
INTERPRETER_BASE_S = 3.0
INTERPRETER_BASE_WORK = 1000**2 * 64
# The backward alone is about 2.5 forwards; forward and backward together 3.5.
INTERPRETER_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
CPU_WARN_S = 180.0


def _itemsize(dtype: str) -> int:
    if dtype == FP8:  # an fp8 case's tensors are made in bf16 (the quantised copies: _fp8_copies)
        return _ITEMSIZE["bfloat16"]
    if dtype in _ITEMSIZE:
        return _ITEMSIZE[dtype]
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _fp8_copies(case: Case) -> int:
    """Bytes of the e4m3 copies of q, k and v that an fp8 case's provider quantises, one byte an
    element beside the bf16 inputs (0 for any other dtype)."""
    if case.dtype != FP8 or case.mode not in TRAINING_MODES:
        return 0
    return (case.batch * case.heads * case.q_len * case.head_dim
            + 2 * case.batch * case.kv_heads * case.seqlen * case.head_dim)


def _lengths(case: Case) -> tuple[int, ...]:
    from .modes import sequence_lengths  # imports the kernels: only for inference modes

    return sequence_lengths(case)


def _tensor_elements(case: Case) -> int:
    """Elements of the mode's inputs and output (`dkbench.measure.modes`), and in bwd/fwd_bwd of their
    gradients: dq, dk, dv and the output's gradient."""
    b, h, hkv, d, s = case.batch, case.heads, case.kv_heads, case.head_dim, case.seqlen
    if case.mode in TRAINING_MODES:
        q, kv = b * h * case.q_len * d, b * hkv * s * d
        tensors = 2 * q + 2 * kv  # q, k, v and the output (shaped like q)
        return 2 * tensors if case.mode in GRAD_MODES else tensors
    if case.mode == "decode":
        return 2 * b * h * d + 2 * b * s * hkv * d  # q, output; the k and v caches
    total = sum(_lengths(case))  # prefill_varlen: packed sequences and their padded copies
    return 2 * total * h * d + 2 * total * hkv * d + b * h * s * d + 2 * b * hkv * s * d


def _score_elements(case: Case, provider_name: str | None) -> int:
    if provider_name not in SCORE_PROVIDERS:
        return 0
    if provider_name == REFERENCE and case.mode == "prefill_varlen":
        return case.heads * max(_lengths(case)) * case.seqlen  # one sequence at a time
    return case.batch * case.heads * case.q_len * case.seqlen


def estimate_case_bytes(case: Case, provider_name: str | None) -> int:
    """Device memory one case x provider needs at least: q, k, v and the output at the case's dtype
    (and their gradients in bwd/fwd_bwd), plus the fp32 (batch, heads, q_len, seqlen) score
    matrix for `sdpa_math` and the check's dense reference (`REFERENCE`). `provider_name` None
    counts the case's tensors alone."""
    return (_tensor_elements(case) * _itemsize(case.dtype) + _fp8_copies(case)
            + _score_elements(case, provider_name) * SCORE_BYTES)


def device_capacity_bytes(device: torch.device | str) -> int | None:
    """The device's whole memory: CUDA's total (torch.cuda.mem_get_info), a CPU's physical RAM
    (pages times page size); None for another kind of device.

    The total, not what is free: when the runner asks, the case's own inputs are already
    allocated, and a case that needs more than the whole device can never run.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # a platform without these names
            return None
    return None


def _gib(n: float) -> str:
    x = n / GIB
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def too_big(case: Case, provider: str | None, device: torch.device | str,
            check_tokens: int | None = None) -> str | None:
    """Why the case x provider cannot fit on `device` ("estimated out of memory: needs X GiB,
    device has Y GiB"), or None when it may. With `check_tokens` (the sweep's
    check.max_tokens, when the check is on) the check's dense reference on its cut-down copy of
    the case must fit too."""
    capacity = device_capacity_bytes(device)
    if capacity is None:
        return None
    need = estimate_case_bytes(case, provider)
    if check_tokens is not None:
        from .check import check_case

        need = max(need, estimate_case_bytes(check_case(case, check_tokens), REFERENCE))
    if need <= capacity:
        return None
    return f"estimated out of memory: needs {_gib(need)} GiB, device has {_gib(capacity)} GiB"


def _pairs(case: Case) -> int:
    """Query-key pairs of the case's attention, per head (causal or not, before the halving)."""
    if case.mode in TRAINING_MODES:
        return case.batch * case.q_len * case.seqlen
    if case.mode == "decode":
        return sum(_lengths(case))
    return sum(n * n for n in _lengths(case))


def interpreter_estimate_s(cases: Iterable[Case], providers: Sequence[str]) -> float:
    """Seconds Triton's interpreter needs on a CPU for the cases' bundled-kernel rows: 3 s per
    causal forward of 1,000 tokens, one head, head_dim 64, scaled by pairs x heads x head_dim
    (twice the pairs when not causal), times 2.5 for bwd and 3.5 for fwd_bwd. Providers that run
    no Triton kernel (sdpa_math on a CPU is PyTorch's own code) count as free."""
    interpreted = sum(1 for p in providers if p in INTERPRETED)
    if not interpreted:
        return 0.0
    total = 0.0
    for case in cases:
        work = _pairs(case) * case.heads * case.head_dim * (1 if case.causal else 2)
        total += (INTERPRETER_BASE_S * work / INTERPRETER_BASE_WORK
                  * INTERPRETER_MODE_FACTOR.get(case.mode, 1.0))
    return total * interpreted


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cpu_warning(cases: Iterable[Case], providers: Sequence[str]) -> str | None:
    """A warning when the sweep would keep Triton's interpreter busy for more than CPU_WARN_S
    (see `interpreter_estimate_s`), else None."""
    estimate = interpreter_estimate_s(cases, providers)
    if estimate <= CPU_WARN_S:
        return None
    return (f"on a CPU the bundled kernel runs through Triton's interpreter: this sweep would take "
            f"about {_duration(estimate)} (estimated). For a quick check of the pipeline run "
            "sweeps/smoke.yaml; measure this sweep on a GPU.")
