"""The bundled kernel on fp8 cases (`dtype: fp8`): the case's bf16 inputs quantised to e4m3 (one
descale per head) and run by `kernels.sparse_attention_fp8` (fwd), or by
`kernels.sparse_attention_fp8_trainable` (bwd, fwd_bwd: the fp8 forward and the backward in its
default form, `kernels.FP8_BWD_DEFAULT`, gradients passed straight through the quantisation to
the bf16 inputs).

The quantisation is a step of its own, never inside a timed call. The timed step is called with
the run's bf16 inputs, so the provider quantises the inputs it is given on the first call that
sees them (the check's call, the warm-up) and keeps that one quantised set for the calls on the
same tensors. The run's inputs are not known in `prepare`, so to give `build_ms` what the step
costs, `prepare` quantises a random bf16 set of the case's shapes once, synchronised, and drops
it. The check compares the output (and the gradients) with the reference of the dequantised inputs
(`Prepared.reference_inputs`, straight through to the bf16 inputs as the kernel's gradients are):
the kernel's error, apart from the quantisation's. What the backward makes of dO and of the
quantised inputs (dO in e4m3, or bf16 copies of the inputs) it makes inside the timed call, as a
training step would.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kernels import (
    FP8_BWD_DEFAULT,
    FP8_DTYPE,
    BlockLayout,
    Fp8Inputs,
    LaunchConfig,
    dequantize_fp8,
    fp8_config_problems,
    fp8_gluon_unavailable,
    fp8_triton_default,
    quantize_fp8,
    resolve_fp8_config,
    sparse_attention_fp8,
    sparse_attention_fp8_trainable,
    tile_plan,
)

from ...spec.sweep import Case, Sweep
from .base import Prepared, Unsupported

# Descales per head: a head whose values run larger no longer costs the others their precision.
GRANULARITY = "head"
# What a training row's backward runs, by form (kernels.FP8_BWD_IMPLS), for its config column.
_BACKWARD_FORMS = {"bf16": "the bf16 kernels on the dequantised inputs",
                   "fp8": "the fp8 kernels at their default configs",
                   "gluon": "the bf16 dq kernel and the Gluon fp8 dk/dv kernel"}


class _Quantised:
    """The quantised form of the last (q, k, v) seen, recomputed when given other tensors or
    the same ones changed in place (their version counters)."""

    def __init__(self) -> None:
        self._inputs: tuple = ()
        self._versions: tuple = ()
        self._fp8: Fp8Inputs | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Fp8Inputs:
        versions = (q._version, k._version, v._version)
        same = len(self._inputs) == 3 and all(a is b for a, b in zip(self._inputs, (q, k, v)))
        if self._fp8 is None or not same or versions != self._versions:
            self._fp8 = quantize_fp8(q, k, v, GRANULARITY, seq_dim=2)
            self._inputs, self._versions = (q, k, v), versions
        return self._fp8


def _build_time_quantisation(case: Case, device: torch.device) -> None:
    """Quantise a random bf16 set of the case's input shapes and drop it: what quantising the
    run's inputs costs, inside `prepare`'s time (build_ms)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen)

    h, hkv, d = case.heads, case.kv_heads, case.head_dim
    q, k, v = (randn(case.batch, h, case.q_len, d), randn(case.batch, hkv, case.seqlen, d),
               randn(case.batch, hkv, case.seqlen, d))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    quantize_fp8(q, k, v, GRANULARITY, seq_dim=2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_fp8(case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
    """The bundled provider's `prepare` for an fp8 case. ``config`` (a LaunchConfig, or a dict
    holding one under "fp8") or the spec's ``config`` pins the fp8 forward's launch config;
    otherwise it is looked up."""
    if case.mode not in ("fwd", "bwd", "fwd_bwd"):
        raise Unsupported(f"the fp8 kernel has no {case.mode} form yet: fp8 cases run the "
                          "training modes (fwd, bwd, fwd_bwd) only")
    if isinstance(config, Mapping):
        if "fp8" not in config:
            # The other kernels' pins do not run here: the fp8 backward takes its defaults.
            raise Unsupported(f"an fp8 case runs the kernel fp8 (its forward) with its "
                              f"backward's defaults; pins of {', '.join(sorted(config))} do not "
                              "apply to it")
        config = config["fp8"]
    layout = layout.to(device)
    if isinstance(config, LaunchConfig):
        main, source = config, "explicit"
    elif sweep.config is not None:
        main, source = LaunchConfig(**sweep.config.model_dump()), "explicit"
    else:
        probe = torch.empty(1, 1, 1, case.head_dim, device=device, dtype=FP8_DTYPE)
        main, source = resolve_fp8_config(probe, layout, case.seqlen)
    problems = fp8_config_problems(main, layout.block_size, case.head_dim)
    if problems:
        raise ValueError(f"launch config {main.short()} cannot run the fp8 forward: "
                         + "; ".join(problems))
    why = fp8_gluon_unavailable(device) if main.impl == "gluon" else None
    if why:
        # What the kernel runs, so that the row names the config that was timed.
        main = fp8_triton_default(device, layout.block_size, case.head_dim)
        source = f"{source}; {why}, the Triton kernel's default runs"
    tile_plan(layout, main.block_m, case.seqlen)  # index forms outside the timed region
    _build_time_quantisation(case, device)
    quantised = _Quantised()

    label = f"{main.short()} e4m3 per {GRANULARITY}"
    if case.mode == "fwd":
        def attn(q, k, v):
            x = quantised(q, k, v)
            return sparse_attention_fp8(x.q, x.k, x.v_t, layout, x.q_descale, x.k_descale,
                                        x.v_descale, sm_scale=scale, seq_dim=2, config=main)
    else:
        label += f", bwd {_BACKWARD_FORMS[FP8_BWD_DEFAULT]}"
        source += ", bwd default"

        def attn(q, k, v):
            return sparse_attention_fp8_trainable(q, k, v, layout, sm_scale=scale, seq_dim=2,
                                                  quantized=quantised(q, k, v), config=main)

    def reference_inputs(inputs: tuple) -> tuple:
        # The dequantised values, with the gradient passed straight through to the inputs.
        deq = dequantize_fp8(quantised(*inputs[:3]), seq_dim=2)
        return tuple(t.float() + (d - t.float()).detach() for t, d in zip(inputs, deq))

    return Prepared(attn, label, source, launch_config=main, reference_inputs=reference_inputs)
