"""Quantisation of 16- or 32-bit q, k, v to float8 e4m3 for :func:`kernels.sparse_attention_fp8`.

Each tensor is scaled so that its largest magnitude (per tensor or per head) lands on e4m3's
largest finite value, 448, then rounded (to nearest even, as torch casts); the descale factor
(amax / 448) comes back beside it, and the kernel multiplies it back in float32. v comes back
transposed, ``(batch, kv_heads, dim, seq)`` with the keys contiguous: on Hopper both operands of
an fp8 tensor-core product must be K-major, and for ``p @ v`` the K axis is the keys, so the
kernel then needs no transpose of its own. Plain torch, no kernel of ours: the harness times it
apart from the attention (build_ms).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from . import fp8 as _fp8
from .checks import check_flag, check_scale, check_seq_dim, check_strided
from .common import qk_scale
from .layout import check_device
from .outside_compile import outside_compile

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # e4m3's largest finite value (there is no inf; 0x7f is NaN)
GRANULARITIES = ("tensor", "head")
_SOURCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# v_t's key axis is padded to a multiple of this many elements (bytes), so that its dim stride
# is 16-byte aligned and tensor-memory copies can read it at any sequence length.
_KEY_ALIGN = 16
# float32's smallest positive (subnormal) value: the floor of a descale whose amax is not 0, so
# that values too small for amax / 448 to be a float32 still keep their few bits, not become 0.
_TINY_DESCALE = 2.0**-149
# Descale dtypes sparse_attention_fp8 takes (converted to float32).
_DESCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The fp8 kernel starts its running row maximum at -1e30 (log2 units): scores scaled past that
# would read as masked. |q8 . k8| <= 448^2 x head_dim bounds them.
_SCORE_LIMIT = 1e30


class Fp8Inputs(NamedTuple):
    """q, k and v in e4m3 with their float32 descale factors (``x ≈ x8.float() * descale``).

    ``q``/``k`` keep the layout they were given (``seq_dim``); ``v_t`` is ``(batch, kv_heads,
    dim, seq_k)``, keys contiguous. Descales are ``(1,)`` (granularity "tensor") or one per head:
    ``(heads,)`` for q, ``(kv_heads,)`` for k and v.
    """

    q: torch.Tensor
    k: torch.Tensor
    v_t: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor


def _descale(name: str, t: torch.Tensor, head_axis: int, granularity: str) -> torch.Tensor:
    """amax / 448 per tensor ``(1,)`` or per head ``(heads,)``, float32; 1 where amax is 0, and
    at least float32's smallest subnormal where it is not. Refuses inf and NaN (one host sync)."""
    if granularity == "tensor":
        amax = t.abs().amax().reshape(1)
    else:
        dims = [d for d in range(t.dim()) if d != head_axis]
        amax = t.abs().amax(dim=dims)
    amax = amax.to(torch.float32)
    bad = ~torch.isfinite(amax)
    if bool(bad.any()):
        where = "" if granularity == "tensor" else f" (head {int(bad.nonzero()[0, 0])})"
        raise ValueError(f"{name} holds inf or NaN{where}; quantize_fp8 takes finite values only "
                         "(there is no scale that maps them into e4m3)")
    scale = (amax / E4M3_MAX).clamp_min_(_TINY_DESCALE)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def _cast(t: torch.Tensor, descale: torch.Tensor, head_axis: int) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[head_axis] = descale.numel()
    # One float32 copy, scaled in place (a copy even of float32 input, which must not change).
    scaled = t.to(torch.float32, copy=True).div_(descale.view(shape))
    # Rounding may carry the largest value just past 448; e4m3fn has no inf, so clamp first.
    return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, granularity: str,
           seq_dim: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        check_strided(name, t)
        check_device(name, t)
        if t.dtype not in _SOURCE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; quantize_fp8 takes float16, bfloat16 "
                            "or float32")
        if t.numel() == 0:
            # amax has nothing to reduce: there is no scale to find.
            raise ValueError(f"{name} is empty, shape {tuple(t.shape)}; quantize_fp8 needs at "
                             "least one element in every dimension")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, "
                         f"got {granularity!r}")
    check_seq_dim(seq_dim)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_axis = 3 - seq_dim
    if (q.shape[0], q.shape[3]) != (k.shape[0], k.shape[3]) or q.shape[head_axis] % k.shape[
            head_axis]:
        raise ValueError(f"q and k must share batch and head_dim, and k's heads divide q's "
                         f"(seq_dim={seq_dim}), got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")


@torch.no_grad()
def quantize_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, granularity: str = "head",
                 seq_dim: int = 1) -> Fp8Inputs:
    """q, k, v (float16/bfloat16/float32, ``(batch, seq, heads, dim)`` with ``seq_dim=1`` or
    ``(batch, heads, seq, dim)`` with ``seq_dim=2``) in e4m3, scaled per tensor
    (``granularity="tensor"``) or per head (``"head"``); see :class:`Fp8Inputs`."""
    _check(q, k, v, granularity, seq_dim)
    head_axis = 3 - seq_dim
    q_descale = _descale("q", q, head_axis, granularity)
    k_descale = _descale("k", k, head_axis, granularity)
    v_descale = _descale("v", v, head_axis, granularity)
    q8 = _cast(q, q_descale, head_axis)
    k8 = _cast(k, k_descale, head_axis)
    v8 = _cast(v, v_descale, head_axis)
    v8 = v8.permute(0, 2, 3, 1) if seq_dim == 1 else v8.transpose(2, 3)  # (b, hkv, dim, seq)
    seq_k = v8.shape[3]
    padded = -(-seq_k // _KEY_ALIGN) * _KEY_ALIGN
    v_t = torch.empty(*v8.shape[:3], padded, device=v8.device, dtype=E4M3)[..., :seq_k]
    v_t.copy_(v8)
    return Fp8Inputs(q8, k8, v_t, q_descale, k_descale, v_descale)


def _check_deq_values(name: str, descale: torch.Tensor, device: torch.device) -> None:
    """What the fp8 kernel refuses in a descale: another device, a dtype that is not a float
    one it converts, and (where reading it costs no sync) a value not finite and positive."""
    if descale.device != device:
        raise ValueError(f"x.{name}_descale is on {descale.device}, x.{name} on {device}")
    if descale.dtype not in _DESCALE_DTYPES:
        raise TypeError(f"x.{name}_descale has dtype {descale.dtype}; descales are float32 "
                        "(float16, bfloat16 and float64 are converted)")
    if descale.device.type != "cpu":
        return
    ok = torch.isfinite(descale) & (descale > 0)
    if not bool(ok.all()):
        raise ValueError(f"x.{name}_descale must be finite and positive, got "
                         f"{descale[~ok].flatten()[0].item()}")


def _deq_descale(name: str, descale: object, batch: int, heads: int, head_axis: int,
                 seq_dim: int, device: torch.device) -> torch.Tensor:
    """A descale of ``x`` as float32 broadcast over its tensor: ``(1,)``, ``(heads,)`` or
    ``(batch, heads)``, what :func:`kernels.sparse_attention_fp8` takes."""
    if not isinstance(descale, torch.Tensor):
        raise TypeError(f"x.{name}_descale must be a torch.Tensor, got {type(descale).__name__}")
    _check_deq_values(name, descale, device)
    if descale.dim() <= 1 and descale.numel() not in (1, heads):
        raise ValueError(f"x.{name} has {heads} heads on axis {head_axis} (seq_dim={seq_dim}) "
                         f"but {descale.numel()} descales: give the seq_dim it was quantized "
                         "with")
    try:
        d = descale.to(torch.float32).reshape(-1) if descale.dim() <= 1 else descale.float()
        d = d.expand(batch, heads)
    except RuntimeError:
        raise ValueError(f"x.{name}_descale has shape {tuple(descale.shape)}; expected (1,), "
                         f"({heads},) or ({batch}, {heads})") from None
    shape = [batch, 1, 1, 1]
    shape[head_axis] = heads
    return d.reshape(shape)


def dequantize_fp8(x: Fp8Inputs, seq_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """The float32 values the fp8 kernel computes on: ``(q, k, v)`` in the layout ``seq_dim``
    names (v back to k's layout), each ``x8 * descale``. The fp8 kernel's output is compared
    against attention of these, so the comparison measures the kernel, not the quantisation.
    Descales may be ``(1,)``, one per head or ``(batch, heads)``, as the kernel takes them."""
    if not isinstance(x, Fp8Inputs):
        raise TypeError(f"x must be the Fp8Inputs quantize_fp8 returns, got {type(x).__name__}")
    check_seq_dim(seq_dim)
    head_axis = 3 - seq_dim
    for name in ("q", "k", "v_t"):
        t = getattr(x, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"x.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"x.{name} must be 4-D, got shape {tuple(t.shape)}")
    for name, t8, descale in (("q", x.q, x.q_descale), ("k", x.k, x.k_descale)):
        # The likeliest slip first: a seq_dim other than the one it was quantized with.
        _deq_descale(name, descale, t8.shape[0], t8.shape[head_axis], head_axis, seq_dim,
                     t8.device)
    k_bhsd = x.k.transpose(1, 2) if seq_dim == 1 else x.k
    want = (k_bhsd.shape[0], k_bhsd.shape[1], k_bhsd.shape[3], k_bhsd.shape[2])
    if tuple(x.v_t.shape) != want:
        raise ValueError(f"x.v_t must be (batch, kv_heads, dim, seq_k) = {want} (k's, "
                         f"seq_dim={seq_dim}), got {tuple(x.v_t.shape)}")
    v8 = x.v_t.permute(0, 3, 1, 2) if seq_dim == 1 else x.v_t.transpose(2, 3)
    out = []
    for name, t8, descale in (("q", x.q, x.q_descale), ("k", x.k, x.k_descale),
                              ("v", v8, x.v_descale)):
        d = _deq_descale(name, descale, t8.shape[0], t8.shape[head_axis], head_axis, seq_dim,
                         t8.device)
        out.append(t8.to(torch.float32) * d)
    return tuple(out)


def _checked_descale(name: str, d: object) -> None:
    """What :func:`kernels.fp8._expand_descale` leaves to chance: an fp8 or other odd float
    dtype (its checks then fail inside torch), and a gradient asked of it (silently none)."""
    if isinstance(d, torch.Tensor) and d.is_floating_point() and d.dtype not in _DESCALE_DTYPES:
        raise TypeError(f"{name} has dtype {d.dtype}; descales are float32 (float16, bfloat16 "
                        "and float64 are converted)")
    if isinstance(d, torch.Tensor) and d.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but the fp8 forward is not differentiable and "
                         f"gives it no gradient; pass {name}.detach()")


def _check_score_range(q: torch.Tensor, q_descale, k_descale, sm_scale) -> None:
    """Refuse descales whose product with the softmax scale takes the kernel's float32 scores
    past its range (inf, NaN out; or past its -1e30 row-maximum floor, rows out as 0). Checked
    where the descales are on the host, as the kernel's own positivity check is."""
    if any(d is not None and not isinstance(d, torch.Tensor) for d in (q_descale, k_descale)):
        return  # the kernel's own checks say what is wrong
    ds = [d for d in (q_descale, k_descale) if d is not None]
    if not ds or any(d.device.type != "cpu" or d.numel() == 0 for d in ds):
        return
    if any(d.dtype not in _DESCALE_DTYPES or not bool((torch.isfinite(d) & (d > 0)).all())
           for d in ds):
        return  # the kernel's own checks say what is wrong
    check_scale(sm_scale)
    dim = q.shape[-1]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    qd = 1.0 if q_descale is None else float(q_descale.double().max())
    kd = 1.0 if k_descale is None else float(k_descale.double().max())
    bound = qk_scale(scale) * qd * kd * E4M3_MAX**2 * dim
    if not bound < _SCORE_LIMIT:
        raise ValueError(f"q_descale x k_descale x sm_scale = {qd * kd * scale:.3g}: scores of "
                         f"up to {bound:.3g} (log2 units, |q8 . k8| <= 448^2 x {dim}) would "
                         f"pass the fp8 kernel's float32 range ({_SCORE_LIMIT:.0e}); scale q "
                         "and k down before quantising")


@outside_compile
@functools.wraps(_fp8.sparse_attention_fp8)
def sparse_attention_fp8(q, k, v_t, layout, q_descale=None, k_descale=None, v_descale=None,
                         sm_scale=None, seq_dim=1, return_lse=False, config=None,
                         out_dtype=torch.bfloat16):
    # The checks kernels/fp8.py lacks (that module is hashed into the config-cache keys, so they
    # live here), then the kernel's own checks and launch.
    check_flag("return_lse", return_lse)
    for name, d in (("q_descale", q_descale), ("k_descale", k_descale),
                    ("v_descale", v_descale)):
        _checked_descale(name, d)
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        _check_score_range(q, q_descale, k_descale, sm_scale)
    return _fp8.sparse_attention_fp8(q, k, v_t, layout, q_descale, k_descale, v_descale,
                                     sm_scale=sm_scale, seq_dim=seq_dim, return_lse=return_lse,
                                     config=config, out_dtype=out_dtype)
