"""Is a provider's output right? Compared with the dense reference on a bounded problem.

A case larger than `check.max_tokens` is checked on a cut-down copy (batch 1, shorter sequence,
same pattern, heads and launch config): the reference materialises the token mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kernels import BlockLayout, reference_attention
from kernels.layout import dense_layout

from .providers import Prepared, Provider
from .spec import Case, Sweep


@dataclass(frozen=True)
class CheckResult:
    max_abs_err: float
    rel_err: float
    ok: bool
    what: str  # which tensor had the worst relative error


def random_inputs(case: Case, device: torch.device, requires_grad: bool,
                  generator_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random q, k, v ``(batch, heads, seq, dim)``, reproducible from the seed."""
    gen = torch.Generator(device=device).manual_seed(generator_seed)
    dtype = getattr(torch, case.dtype)

    def one(heads: int, seq: int) -> torch.Tensor:
        t = torch.randn(case.batch, heads, seq, case.head_dim, device=device, dtype=dtype,
                        generator=gen)
        return t.requires_grad_(requires_grad)

    return one(case.heads, case.q_len), one(case.kv_heads, case.seqlen), one(case.kv_heads, case.seqlen)


def check_case(case: Case, max_tokens: int) -> Case:
    """The problem a check runs: the case itself, or a cut-down copy when it is large."""
    if case.batch * case.seqlen <= max_tokens:
        return case
    seqlen = min(case.seqlen, max_tokens)
    q_len = max(1, min(case.q_len, seqlen - (case.seqlen - case.q_len)))
    if case.seqlen - case.q_len >= seqlen:
        q_len = min(case.q_len, seqlen)
    return dataclasses.replace(case, batch=1, seqlen=seqlen, q_len=q_len)


def reference_layout(provider: Provider, layout: BlockLayout, case: Case) -> BlockLayout:
    """What the provider computes: the case's pattern, or the dense (causal) problem."""
    if provider.computes == "pattern":
        return layout
    return dense_layout(-(-case.seqlen // layout.block_size), layout.block_size, case.causal)


def run_check(provider: Provider, prepared: Prepared, case: Case, layout: BlockLayout,
              sweep: Sweep, device: torch.device, scale: float, seed: int) -> CheckResult:
    small = check_case(case, sweep.check.max_tokens)
    if small is not case:
        layout = case.pattern.layout(small.heads, small.kv_heads, small.seqlen, small.causal)
        prepared = provider.prepare(small, layout, sweep, device, scale, prepared.launch_config)
    grads = small.mode != "fwd"
    q, k, v = random_inputs(small, device, grads, seed)
    ref_layout = reference_layout(provider, layout, small)
    out = prepared.attn(q, k, v)
    ref = reference_attention(q, k, v, ref_layout, sm_scale=scale, seq_dim=2, grad=grads)
    pairs = [("out", out, ref)]
    if grads:
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), dout)
        want = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
        pairs += [(n, g, w) for n, g, w in zip(("dq", "dk", "dv"), got, want)]
    tol = sweep.check.rtol[case.dtype]
    worst = CheckResult(0.0, 0.0, True, "out")
    for name, got_t, want_t in pairs:
        diff = (got_t.detach().double() - want_t.detach().double())
        finite = bool(torch.isfinite(got_t).all())
        rel = float(diff.norm() / want_t.detach().double().norm().clamp_min(1e-30)) if finite else float("inf")
        max_abs = float(diff.abs().max()) if finite else float("inf")
        if rel >= worst.rel_err:
            worst = CheckResult(max(max_abs, worst.max_abs_err), rel, rel <= tol, name)
        else:
            worst = dataclasses.replace(worst, max_abs_err=max(max_abs, worst.max_abs_err))
    return worst
