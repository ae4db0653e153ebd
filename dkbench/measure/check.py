"""Is a provider's output right? Compared with the dense reference on a bounded problem.

A case larger than `check.max_tokens` is checked on a cut-down copy (batch 1, shorter sequence,
the leading blocks of the same pattern, heads and launch config): the reference materialises the
token mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kernels import BlockLayout, sparse_attention

from ..spec.sweep import FP8, TRAINING_MODES, Case, Sweep
from .modes import make_inputs, reference
from .providers import Prepared, Provider


@dataclass(frozen=True)
class CheckResult:
    max_abs_err: float
    rel_err: float
    ok: bool
    what: str  # which tensor had the worst relative error
    # fp8 rows: the output's relative error against our bf16 kernel on the same bf16 inputs,
    # the quantisation's cost end to end (reported beside rel_err, which is the kernel's own);
    # in the grad modes the worst of the output's and the gradients'. None for every other row.
    vs_bf16: float | None = None
    vs_bf16_what: str = "out"  # which tensor vs_bf16 is of


def random_inputs(case: Case, device: torch.device, requires_grad: bool,
                  generator_seed: int) -> tuple:
    """Fresh random inputs for the case's mode (see `dkbench.measure.modes`), reproducible from the seed;
    training inputs track gradients when ``requires_grad``."""
    # An fp8 case's inputs are bf16: the provider that computes in fp8 quantises them itself.
    made = dataclasses.replace(case, dtype="bfloat16") if case.dtype == FP8 else case
    inputs = make_inputs(made, device, generator_seed)
    if case.mode in TRAINING_MODES:
        return tuple(t.detach().requires_grad_(requires_grad) for t in inputs)
    return inputs


def check_case(case: Case, max_tokens: int) -> Case:
    """The problem a check runs: the case itself, or a cut-down copy when it is large."""
    if case.batch * case.seqlen <= max_tokens:
        return case
    seqlen = min(case.seqlen, max_tokens)
    q_len = max(1, min(case.q_len, seqlen - (case.seqlen - case.q_len)))
    if case.seqlen - case.q_len >= seqlen:
        q_len = min(case.q_len, seqlen)
    # Inference modes keep two sequences, so different lengths are still checked.
    batch = 1 if case.mode in TRAINING_MODES else min(case.batch, 2)
    return dataclasses.replace(case, batch=batch, seqlen=seqlen, q_len=q_len)


def check_layout(layout: BlockLayout, small: Case) -> BlockLayout:
    """The timed case's pattern over the cut-down case's tokens: its leading blocks, the first
    ``small.seqlen`` positions of a sequence. Not the pattern built again at that length: a
    random one would be drawn anew, so the check would run a pattern other than the one timed.
    A pattern whose corner is not a valid one on its own (a bidirectional row whose kept blocks
    all lie past it) is built again at the shorter length instead, as before."""
    blocks = -(-small.seqlen // layout.block_size)
    _, q_blocks, k_blocks = layout.pattern.shape
    if q_blocks != k_blocks or blocks >= q_blocks:
        return layout  # covers the cut-down case as it is (a file pattern's own shape)
    corner = layout.pattern[:, :blocks, :blocks].contiguous()
    try:
        return BlockLayout.from_pattern(corner, layout.block_size, layout.causal,
                                        layout.description, warn_kv_cache=False)
    except ValueError:
        return small.pattern.layout(small.heads, small.kv_heads, small.seqlen, small.causal)


def run_check(provider: Provider, prepared: Prepared, case: Case, layout: BlockLayout,
              sweep: Sweep, device: torch.device, scale: float, seed: int) -> CheckResult:
    small = check_case(case, sweep.check.max_tokens)
    if small is not case:
        layout = check_layout(layout, small)
        prepared = provider.prepare(small, layout, sweep, device, scale, prepared.launch_config)
    grads = small.mode in ("bwd", "fwd_bwd")
    inputs = random_inputs(small, device, grads, seed)
    out = prepared.attn(*inputs)
    ref = reference(small, prepared.reference_inputs(inputs), layout, scale, provider.computes,
                    grad=grads)
    pairs = [("out", prepared.canonical(out), ref)]
    if grads:
        q, k, v = inputs
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), dout)
        want = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
        pairs += [(n, g, w) for n, g, w in zip(("dq", "dk", "dv"), got, want)]
    if small.dtype == FP8:
        vs_bf16 = _against_bf16(pairs, inputs, layout, scale, dout if grads else None)
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
    if small.dtype == FP8:
        worst = dataclasses.replace(worst, vs_bf16=vs_bf16[0], vs_bf16_what=vs_bf16[1])
    return worst


def _against_bf16(pairs: list, inputs: tuple, layout: BlockLayout, scale: float,
                  dout: torch.Tensor | None) -> tuple[float, str]:
    """An fp8 row's worst relative error, and of which tensor, against our bf16 kernel on the
    same bf16 inputs: the output's, and with ``dout`` the gradients' too."""
    bf16 = sparse_attention(*inputs, layout, sm_scale=scale, seq_dim=2)
    want = [bf16]
    if dout is not None:
        want += torch.autograd.grad(bf16, inputs, dout)
    errors = [(_rel(got, w), name) for (name, got, _), w in zip(pairs, want)]
    return max(errors)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = got.detach().double() - want.detach().double()
    return float(diff.norm() / want.detach().double().norm().clamp_min(1e-30))
