"""Argument checks shared by every public entry point: each failure is a ValueError or TypeError
that names the argument, raised before any kernel is launched."""

from __future__ import annotations

import math

import torch

from .common import interpreting
from .layout import BlockLayout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def check_tensors(names: tuple[str, str, str], tensors: tuple, rank: int, shape_hint: str) -> None:
    """Types, ranks, dtypes and devices of q, k, v (under ``names``)."""
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {shape_hint}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    q, k, v = tensors
    joined = ", ".join(names[:2]) + " and " + names[2]
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{joined} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{joined} must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type == "cpu" and not interpreting():
        raise ValueError(f"{joined} are CPU tensors: the Triton kernels need a GPU, or "
                         "TRITON_INTERPRET=1 set before triton is imported to run on the CPU")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {q.device}")


def check_heads(heads: int, kv_heads: int, dim: int, layout: BlockLayout) -> None:
    """head_dim range, GQA divisibility, and the layout's pattern heads."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"the number of query heads ({heads}) must be a multiple of the number of "
                         f"kv heads ({kv_heads})")
    if layout.heads not in (1, kv_heads, heads):
        raise ValueError(f"layout has {layout.heads} pattern heads; expected 1, kv_heads={kv_heads} "
                         f"or heads={heads}")


def check_scale(sm_scale: float | None) -> None:
    if sm_scale is not None and not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale}")


def check_inference_only(names: tuple[str, ...], tensors: tuple, form: str) -> None:
    """Refuse inputs that ask for gradients: ``form`` (e.g. "the decode form") has no backward."""
    for name, t in zip(names, tensors):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad: {form} inference-only; use sparse_attention "
                             "for training")


def check_same_shape(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Keys and values come in one shape."""
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
