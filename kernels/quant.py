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

from typing import NamedTuple

import torch

from .checks import check_seq_dim

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # e4m3's largest finite value (there is no inf; 0x7f is NaN)
GRANULARITIES = ("tensor", "head")
_SOURCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# v_t's key axis is padded to a multiple of this many elements (bytes), so that its dim stride
# is 16-byte aligned and tensor-memory copies can read it at any sequence length.
_KEY_ALIGN = 16


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


def _descale(t: torch.Tensor, head_axis: int, granularity: str) -> torch.Tensor:
    """amax / 448 per tensor ``(1,)`` or per head ``(heads,)``, float32; 1 where amax is 0."""
    if granularity == "tensor":
        amax = t.abs().amax().reshape(1)
    else:
        dims = [d for d in range(t.dim()) if d != head_axis]
        amax = t.abs().amax(dim=dims)
    scale = amax.to(torch.float32) / E4M3_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


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
    q_descale = _descale(q, head_axis, granularity)
    k_descale = _descale(k, head_axis, granularity)
    v_descale = _descale(v, head_axis, granularity)
    q8 = _cast(q, q_descale, head_axis)
    k8 = _cast(k, k_descale, head_axis)
    v8 = _cast(v, v_descale, head_axis)
    v8 = v8.permute(0, 2, 3, 1) if seq_dim == 1 else v8.transpose(2, 3)  # (b, hkv, dim, seq)
    seq_k = v8.shape[3]
    padded = -(-seq_k // _KEY_ALIGN) * _KEY_ALIGN
    v_t = torch.empty(*v8.shape[:3], padded, device=v8.device, dtype=E4M3)[..., :seq_k]
    v_t.copy_(v8)
    return Fp8Inputs(q8, k8, v_t, q_descale, k_descale, v_descale)


def dequantize_fp8(x: Fp8Inputs, seq_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """The float32 values the fp8 kernel computes on: ``(q, k, v)`` in the layout ``seq_dim``
    names (v back to k's layout), each ``x8 * descale``. The fp8 kernel's output is compared
    against attention of these, so the comparison measures the kernel, not the quantisation."""
    if not isinstance(x, Fp8Inputs):
        raise TypeError(f"x must be the Fp8Inputs quantize_fp8 returns, got {type(x).__name__}")
    check_seq_dim(seq_dim)
    head_axis = 3 - seq_dim
    for name, t8, descale in (("q", x.q, x.q_descale), ("k", x.k, x.k_descale)):
        if descale.numel() not in (1, t8.shape[head_axis]):
            raise ValueError(f"x.{name} has {t8.shape[head_axis]} heads on axis {head_axis} "
                             f"(seq_dim={seq_dim}) but {descale.numel()} descales: give the "
                             "seq_dim it was quantized with")

    def one(t8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
        shape = [1] * 4
        shape[head_axis] = descale.numel()
        return t8.to(torch.float32) * descale.to(torch.float32).view(shape)

    v8 = x.v_t.permute(0, 3, 1, 2) if seq_dim == 1 else x.v_t.transpose(2, 3)
    return one(x.q, x.q_descale), one(x.k, x.k_descale), one(v8, x.v_descale)
