"""One tolerance table and one verbose comparison for every numerical test."""

from __future__ import annotations

import torch

# Relative error ||actual - expected|| / ||expected|| allowed per (input dtype, device type).
# float32 on a GPU runs its dots in tf32; bf16 keeps 8 mantissa bits.
REL_TOL = {
    (torch.float32, "cpu"): 1e-5,
    (torch.float32, "cuda"): 5e-3,
    (torch.float16, "cpu"): 2e-3,
    (torch.float16, "cuda"): 2e-3,
    (torch.bfloat16, "cpu"): 1e-2,
    (torch.bfloat16, "cuda"): 1e-2,
    # fp8 (e4m3 q, k, v), against the float reference of the dequantised inputs, so that only
    # the kernel's own rounding counts: the probabilities are rounded to e4m3 for p v, 3 mantissa
    # bits, so each p carries up to 2^-4 relative error (about 2.6% RMS) and the output, a
    # weighted sum of them, about 2% (1.7-2.1% measured on random inputs). On the CPU the
    # kernel emulates the rounding (kernels/fp8.py); on the GPU the cast does it.
    (torch.float8_e4m3fn, "cpu"): 5e-2,
    (torch.float8_e4m3fn, "cuda"): 5e-2,
}

# fp8 end to end: against the reference of the original (unquantised) inputs, the quantisation
# of q, k and v counts too: each rounds with up to 2^-4 relative error, and through the scores
# and v the output drifts about 5% (4.6-5% measured on random inputs) from the 16-bit result.
FP8_END_TO_END_TOL = 1e-1
# The natural-log LSE of an fp8 run against that of its dequantised inputs, per device type. On
# the CPU the row sums add the unrounded probabilities in float32, so only float32 rounding is
# left. On Hopper the fp8 products sum q kᵀ with about 14 mantissa bits, not float32's 24, and
# the Gluon kernel's row sums add the probabilities as rounded to e4m3 for p v (taken from the
# tensor cores, each step's from zero, added up in float32): a row whose sum is a few large
# probabilities carries their rounding into its LSE (0.02 at most at phi-3's 8k and 16k), while
# the error's norm over all rows stays inside the budget (kernels/PERF.md, H200 session 14).
FP8_LSE_TOL = {"cpu": 1e-5, "cuda": 1e-3}


def rel_tol(dtype: torch.dtype, device: str | torch.device) -> float:
    return REL_TOL[(dtype, torch.device(device).type)]


def assert_verbose_close(actual: torch.Tensor, expected: torch.Tensor, tol: float,
                         name: str = "output") -> None:
    """Fail on NaN/inf, on a shape mismatch, or on relative error above ``tol``; show the worst."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = ~torch.isfinite(a)
    assert not bad.any(), (f"{name}: {int(bad.sum())} non-finite elements (unwritten or overflow), "
                           f"first at {bad.nonzero()[:5].tolist()}")
    diff = (a - e).abs()
    rel = float(diff.norm() / e.norm().clamp_min(1e-30))
    if rel > tol:
        worst = diff.flatten().topk(min(5, diff.numel())).indices
        where = [tuple(int(i) for i in torch.unravel_index(w, diff.shape)) for w in worst]
        detail = ", ".join(f"{w}: {a[w].item():.5g} vs {e[w].item():.5g}" for w in where)
        raise AssertionError(f"{name}: relative error {rel:.3e} > {tol:.1e}; worst: {detail}")
# fp8 gradients (kernels/fp8_bwd.py) against those of the float reference of the dequantised
# inputs: dO is rounded to e4m3 (up to 2^-4 relative, about 2% RMS) for dO vᵀ and pᵀ dO, and p
# to e4m3 for pᵀ dO, so dv carries both roundings (3.5-3.9% measured on random inputs) and dq,
# dk the first (2.6-2.9%); dS runs in bfloat16 on a GPU, float32 in the interpreter.
FP8_GRAD_TOL = 6e-2
# The same gradients by the "bf16" backward (the 16-bit kernels on bfloat16 copies of the
# dequantised inputs): each copy rounds by up to 2^-9, and the 16-bit kernels keep their own
# bfloat16 error (1e-2 above); 0.4-0.9% measured on random inputs.
FP8_BF16_GRAD_TOL = 2e-2
