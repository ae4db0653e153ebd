"""fp8 attention for training: the backward's public function, and an autograd form that
quantises 16- or 32-bit q, k, v, runs the fp8 forward (:mod:`kernels.fp8`) and backward
(:mod:`kernels.fp8_bwd`), and passes the gradients straight through the quantisation (the
gradient of ``x -> dequantise(quantise(x))`` taken as the identity, as fp8 training does)."""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as forward_ad

from . import fp8_bwd_ws
from .attention import _functorch_wrapped, gradients, refuse_scale_grad
from .checks import (
    check_config_type,
    check_heads,
    check_scale,
    check_seq_dim,
    check_strided,
)
from .fp8 import FP8_DTYPE, _expand_descale, check_fp8_shapes
from .fp8_bwd import (
    Fp8BwdConfigs,
    dequantised_inputs,
    fp8_bwd_config_problems,
    fp8_bwd_default_configs,
    sparse_attention_fp8_bwd_views,
)
from .layout import BlockLayout, check_device
from .outside_compile import outside_compile
from .quant import _DESCALE_DTYPES, Fp8Inputs, quantize_fp8, sparse_attention_fp8

__all__ = ["FP8_BWD_DEFAULT", "FP8_BWD_IMPLS", "sparse_attention_fp8_bwd",
           "sparse_attention_fp8_trainable"]

_GRAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# How the fp8 backward runs: "fp8", its own kernels on the e4m3 tensors (kernels/fp8_bwd.py);
# "bf16", the 16-bit backward's kernels on bfloat16 copies of the dequantised inputs; "gluon",
# the 16-bit dq kernel on those copies and a Gluon dk/dv kernel in e4m3 (kernels/fp8_bwd_ws.py).
FP8_BWD_IMPLS = ("fp8", "bf16", "gluon")
# What the forms other than "fp8" run instead of the fp8 kernels' configs.
_OWN_CONFIGS = {"bf16": "the 16-bit backward at its own looked-up configs",
                "gluon": "the 16-bit dq kernel at its looked-up config and a Gluon dk/dv kernel "
                         "of fixed tiles"}
# The default: on an H200 at phi-3's shapes (16k and 64k tokens, 32/8 heads, d128) the fp8
# forward with the "bf16" backward ran at 0.89-1.00x of the bf16 forward+backward and the "fp8"
# one at 0.77-0.78x (its Triton dk/dv kernel took 1.8x the Gluon 16-bit one's time), and "bf16"
# keeps the gradients closer (0.5-1% against the dequantised reference, 2.7-3.7% for "fp8"):
# kernels/PERF.md, session 10.
FP8_BWD_DEFAULT = "bf16"


def _bf16_gradients(do, q, k, v_t, out, lse, layout, descales, sm_scale):
    """The 16-bit backward on the dequantised inputs, bf16: P recomputed from them and the fp8
    forward's LSE."""
    q16, k16, v16 = dequantised_inputs(q, k, v_t, descales)
    return gradients(do.to(torch.bfloat16), q16, k16, v16, out.to(torch.bfloat16), lse, layout,
                     sm_scale)


def _bhsd(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
    return t.transpose(1, 2) if seq_dim == 1 else t


def _check_like(name: str, t: object, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (q's), got {tuple(t.shape)}")
    check_strided(name, t)
    # The three the message names: float64 and e5m2 got through an is_floating_point() test
    # (e5m2 then failed inside torch in the fp8 form's dO pre-pass).
    if t.dtype not in _GRAD_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; it must be float16, bfloat16 or float32")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")


def _check_quantized(x: object) -> Fp8Inputs:
    if not isinstance(x, Fp8Inputs):
        raise TypeError(f"expected the Fp8Inputs quantize_fp8 returns, got {type(x).__name__}")
    for name in ("q", "k", "v_t"):
        t = getattr(x, name)
        if not isinstance(t, torch.Tensor) or t.dtype != FP8_DTYPE or t.dim() != 4:
            raise TypeError(f"x.{name} must be a 4-D torch.float8_e4m3fn tensor "
                            "(what quantize_fp8 returns)")
    check_device("x.q", x.q)
    for name in ("k", "v_t"):
        # Was: torch's "Cannot copy out of meta tensor" (or a kernel reading across devices).
        if getattr(x, name).device != x.q.device:
            raise ValueError(f"x.{name} is on {getattr(x, name).device}, x.q on {x.q.device}")
    for name in ("q_descale", "k_descale", "v_descale"):
        d = getattr(x, name)
        # Was: None read as 1 (the forward's default, not a quantisation's: gradients of other
        # inputs than the forward's), an e4m3 descale failed inside torch ("isfinite").
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"x.{name} must be a torch.Tensor (quantize_fp8 gives one), got "
                            f"{type(d).__name__}")
        if d.is_floating_point() and d.dtype not in _DESCALE_DTYPES:
            raise TypeError(f"x.{name} has dtype {d.dtype}; descales are float32 (float16, "
                            "bfloat16 and float64 are converted)")
    return x


def _check_bwd_configs(name: str, configs: object, layout: BlockLayout) -> None:
    if not isinstance(configs, Fp8BwdConfigs):
        raise TypeError(f"{name} must be a kernels.Fp8BwdConfigs, got {type(configs).__name__}")
    problems = fp8_bwd_config_problems(configs, layout.block_size)
    if problems:
        raise ValueError(f"invalid fp8 backward configs: {'; '.join(problems)} (the {name} "
                         "argument)")


def _check_not_differentiated(named: tuple) -> None:
    """The backward is not differentiable: an input that asks for a gradient through it would
    silently get none (its results carry no graph), so it is refused, as the fp8 forward refuses
    descales that ask. Under torch.no_grad (as autograd runs a backward) anything passes."""
    if not torch.is_grad_enabled():
        return
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but sparse_attention_fp8_bwd is not "
                             "differentiable and its gradients carry none back to it; pass "
                             f"{name}.detach(), or call it under torch.no_grad()")


def _check_impl(impl_name: str, impl: object, configs_name: str, configs: object) -> None:
    """``impl`` one of :data:`FP8_BWD_IMPLS`, and ``configs`` given only to the form that takes
    them; the names are the caller's arguments."""
    if impl not in FP8_BWD_IMPLS:
        raise ValueError(f"{impl_name} must be one of {', '.join(FP8_BWD_IMPLS)}, got {impl!r}")
    if impl != "fp8" and configs is not None:
        raise ValueError(f"{configs_name} are the fp8 kernels' ({impl_name}='fp8'); "
                         f"{impl_name}={impl!r} runs {_OWN_CONFIGS[impl]}")


def _check_gluon_takes(impl_name: str, q: torch.Tensor, layout: BlockLayout, seq_q: int,
                       seq_k: int) -> None:
    """The "gluon" form's refusal of a call (``q`` ``(b, h, s, d)``), naming the argument."""
    why = fp8_bwd_ws.refusal(q, layout, seq_q, seq_k)
    if why:
        raise ValueError(f"{impl_name}='gluon' cannot take this call: {why} ({impl_name}='bf16' "
                         "runs anywhere)")


def sparse_attention_fp8_bwd(do: torch.Tensor, x: Fp8Inputs, out: torch.Tensor,
                             lse: torch.Tensor, layout: BlockLayout,
                             sm_scale: float | None = None, seq_dim: int = 1,
                             configs: Fp8BwdConfigs | None = None,
                             grad_dtype: torch.dtype = torch.bfloat16,
                             impl: str = FP8_BWD_DEFAULT
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`kernels.sparse_attention_fp8` with respect to its dequantised
    inputs (``x.q x q_descale`` and so on): ``(dq, dk, dv)`` in ``grad_dtype``, dq in q's layout
    and dk, dv in k's (``seq_dim``; dv is not transposed like ``x.v_t``).

    ``do`` is the output's gradient and ``out``, ``lse`` what the forward returned (with
    ``return_lse=True``), for the same ``x``, ``layout``, ``sm_scale`` and ``seq_dim``.
    ``impl`` (one of :data:`FP8_BWD_IMPLS`) chooses the kernels:

    - ``"bf16"`` (the default, :data:`FP8_BWD_DEFAULT`): the 16-bit backward's kernels (the
      tuned warp-specialised ones on Hopper) on bfloat16 copies of the dequantised inputs, dO
      as given;
    - ``"fp8"``: the fp8 kernels of :mod:`kernels.fp8_bwd`, dO quantised to e4m3 per (batch,
      head) inside, the products with dS in bfloat16. ``configs`` pins their launch configs
      (:class:`kernels.Fp8BwdConfigs`; rules: :func:`kernels.fp8_bwd_config_problems`); with
      the other forms it must be None;
    - ``"gluon"`` (Hopper, head_dim 64 or 128, blocks of a multiple of 64, ``seq_k - seq_q`` a
      multiple of 32): the 16-bit dq kernel on the bf16 copies, and a warp-specialised Gluon
      dk/dv kernel with ``dO vᵀ`` and ``pᵀ dO`` in e4m3 (:mod:`kernels.fp8_bwd_ws`; dO
      quantised per (batch, kv group)). Measured at 0.95-1.02x of ``"bf16"``'s time on an H200.
    """
    _check_impl("impl", impl, "configs", configs)
    x = _check_quantized(x)
    check_seq_dim(seq_dim)
    check_scale(sm_scale)
    if grad_dtype not in _GRAD_DTYPES:
        raise TypeError(f"grad_dtype must be torch.bfloat16, torch.float16 or torch.float32, "
                        f"got {grad_dtype}")
    q, k = _bhsd(x.q, seq_dim), _bhsd(x.k, seq_dim)
    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    # As the forward: no batch is no call (was an AssertionError from the 16-bit launcher).
    check_fp8_shapes(q, k, x.v_t, "x.")
    for name, t in (("do", do), ("out", out)):
        _check_like(name, t, tuple(x.q.shape), x.q.device)
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(
            lse.shape) != (batch, heads, seq_q):
        raise ValueError(f"lse must be the forward's float32 (batch, heads, seq_q) = "
                         f"{(batch, heads, seq_q)} log-sum-exp (return_lse=True)")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device}, q on {q.device}")
    # The forward's LSE is finite in every row (even one with no kept keys: its running maximum
    # starts at -1e30). Checked on the host, where it costs no wait for a device: a NaN gave NaN
    # gradients, an inf silently zero ones.
    if lse.device.type == "cpu" and not bool(torch.isfinite(lse).all()):
        raise ValueError("lse holds inf or NaN; the forward's log-sum-exp (return_lse=True) is "
                         "finite in every row")
    _check_not_differentiated((("do", do), ("out", out), ("lse", lse), ("sm_scale", sm_scale),
                               *((f"x.{f}", getattr(x, f)) for f in Fp8Inputs._fields)))
    check_heads(heads, kv_heads, dim, layout)
    layout.check_seqlen(seq_k, seq_q)
    descales = (_expand_descale("x.q_descale", x.q_descale, batch, heads, q.device),
                _expand_descale("x.k_descale", x.k_descale, batch, kv_heads, q.device),
                _expand_descale("x.v_descale", x.v_descale, batch, kv_heads, q.device))
    if isinstance(sm_scale, torch.Tensor):
        sm_scale = sm_scale.detach()  # asks no gradient (checked above); float() would warn
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    if impl in ("bf16", "gluon"):
        layout = layout.to(q.device)
        if impl == "gluon":
            _check_gluon_takes("impl", q, layout, seq_q, seq_k)
            form = fp8_bwd_ws.gluon_gradients
        else:
            form = _bf16_gradients
        grads = form(_bhsd(do, seq_dim), q, k, x.v_t, _bhsd(out, seq_dim), lse.contiguous(),
                     layout, descales, scale)
        return tuple(_bhsd(g if g.dtype == grad_dtype else g.to(grad_dtype), seq_dim)
                     for g in grads)
    if configs is None:
        configs = fp8_bwd_default_configs(q.device, dim)
    _check_bwd_configs("configs", configs, layout)
    dq, dk, dv = sparse_attention_fp8_bwd_views(
        _bhsd(do, seq_dim), q, k, x.v_t, _bhsd(out, seq_dim), lse.contiguous(),
        layout.to(q.device), descales, scale, configs, grad_dtype)
    return _bhsd(dq, seq_dim), _bhsd(dk, seq_dim), _bhsd(dv, seq_dim)


def _check_untransformed(q: object, k: object, v: object) -> None:
    """What autograd cannot get through the kernels, as kernels.sparse_attention refuses it:
    torch.func transforms' wrappers (no storage to read) and forward-mode dual tensors (the
    Function has no jvp)."""
    for t in (q, k, v):
        if isinstance(t, torch.Tensor) and (_functorch_wrapped(t)
                                            or forward_ad.unpack_dual(t).tangent is not None):
            raise RuntimeError("sparse_attention_fp8_trainable does not support torch.func "
                               "transforms (grad, vmap, jacrev, jvp, ...) or forward-mode AD: "
                               "differentiate it with torch.autograd.grad or .backward()")


class _Fp8AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, x, layout, sm_scale, seq_dim, config, bwd_configs, bwd_impl):
        out, lse = sparse_attention_fp8(x.q, x.k, x.v_t, layout, x.q_descale, x.k_descale,
                                        x.v_descale, sm_scale=sm_scale, seq_dim=seq_dim,
                                        return_lse=True, config=config, out_dtype=q.dtype)
        ctx.save_for_backward(out, lse)
        ctx.x, ctx.layout, ctx.sm_scale, ctx.seq_dim = x, layout, sm_scale, seq_dim
        ctx.bwd_configs, ctx.bwd_impl = bwd_configs, bwd_impl
        ctx.grad_dtypes = (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if _functorch_wrapped(grad_out):
            # vmap over the backward hands the kernels a batched grad they cannot read.
            raise RuntimeError("the fp8 attention's backward cannot run batched "
                               "(torch.autograd.grad(..., is_grads_batched=True), "
                               "torch.autograd.functional.jacobian(vectorize=True), vmap): "
                               "take one grad_outputs at a time")
        if torch.is_grad_enabled():
            raise RuntimeError("double backward through the fp8 attention is not supported "
                               "(the backward kernels are not differentiable)")
        out, lse = ctx.saved_tensors
        grads = sparse_attention_fp8_bwd(grad_out, ctx.x, out, lse, ctx.layout, ctx.sm_scale,
                                         ctx.seq_dim, ctx.bwd_configs, torch.float32
                                         if torch.float32 in ctx.grad_dtypes else torch.bfloat16,
                                         ctx.bwd_impl)
        grads = [g if g.dtype == dt else g.to(dt) for g, dt in zip(grads, ctx.grad_dtypes)]
        return (*grads, None, None, None, None, None, None, None)


@outside_compile
def sparse_attention_fp8_trainable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   layout: BlockLayout, sm_scale: float | None = None,
                                   seq_dim: int = 1, granularity: str = "head",
                                   quantized: Fp8Inputs | None = None, config=None,
                                   bwd_configs: Fp8BwdConfigs | None = None,
                                   bwd_impl: str = FP8_BWD_DEFAULT) -> torch.Tensor:
    """Block-sparse attention in fp8 that autograd can train through: q, k, v (float16,
    bfloat16 or float32, layouts as :func:`kernels.sparse_attention`) are quantised to e4m3
    (:func:`kernels.quantize_fp8`, ``granularity``), the fp8 forward runs, and the backward gives
    q, k and v the gradients of the dequantised inputs (straight through the quantisation), in
    their own dtypes. The output is in q's dtype.

    ``quantized`` skips the quantisation: a :func:`kernels.quantize_fp8` result of these same
    q, k, v (with this ``seq_dim``), for a caller that keeps it; nothing checks that it is
    theirs beyond the shapes. ``config`` pins the forward's launch config; ``bwd_impl`` and
    ``bwd_configs`` are :func:`kernels.sparse_attention_fp8_bwd`'s ``impl`` and ``configs``.
    """
    _check_impl("bwd_impl", bwd_impl, "bwd_configs", bwd_configs)
    _check_untransformed(q, k, v)
    # Was: trained through with no gradient for it, silently (and a warning from float()).
    refuse_scale_grad(sm_scale)
    if isinstance(sm_scale, torch.Tensor):
        sm_scale = sm_scale.detach()
    check_seq_dim(seq_dim)
    check_config_type("config", config)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _GRAD_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; it must be float16, bfloat16 or "
                            "float32 (e4m3 inputs: kernels.sparse_attention_fp8)")
    if bwd_configs is not None and isinstance(layout, BlockLayout):
        # Here, not first in the backward, after a whole forward.
        _check_bwd_configs("bwd_configs", bwd_configs, layout)
    if quantized is None:
        quantized = quantize_fp8(q, k, v, granularity, seq_dim=seq_dim)
    else:
        quantized = _check_quantized(quantized)
        if (quantized.q.shape, quantized.k.shape) != (q.shape, k.shape) or v.shape != k.shape:
            raise ValueError(f"quantized holds q {tuple(quantized.q.shape)} and k "
                             f"{tuple(quantized.k.shape)}; the inputs are q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    if bwd_impl == "gluon" and isinstance(layout, BlockLayout):
        # Said before the forward runs, not when the backward is reached.
        bhsd_q, bhsd_k = _bhsd(quantized.q, seq_dim), _bhsd(quantized.k, seq_dim)
        _check_gluon_takes("bwd_impl", bhsd_q, layout, bhsd_q.shape[2], bhsd_k.shape[2])
    return _Fp8AttentionFn.apply(q, k, v, quantized, layout, sm_scale, seq_dim, config,
                                 bwd_configs, bwd_impl)
