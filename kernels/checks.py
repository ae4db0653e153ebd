"""Argument checks shared by every public entry point: each failure is a ValueError or TypeError
that names the argument, raised before any kernel is launched."""

from __future__ import annotations

import math
import numbers

import torch

from .common import interpreting
from .configs import LaunchConfig
from .layout import BlockLayout, is_int

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def check_tensors(names: tuple[str, str, str], tensors: tuple, rank: int, shape_hint: str) -> None:
    """Types, ranks, dtypes and devices of q, k, v (under ``names``)."""
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {shape_hint}, got shape {tuple(t.shape)}")
        check_strided(name, t)
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


def check_strided(name: str, t: torch.Tensor) -> None:
    """A dense tensor: the kernels (and quantize_fp8's reductions) read strided storage, which a
    sparse or mkldnn tensor has none of."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got {t.layout}; call "
                        ".to_dense() first")


def check_flag(name: str, value: bool) -> None:
    """A Python bool: a truthy 1 or "no" would silently pick a form (a tuple for return_lse)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_heads(heads: int, kv_heads: int, dim: int, layout: BlockLayout) -> None:
    """head_dim range, GQA divisibility, and the layout's pattern heads."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {dim}")
    if not is_int(kv_heads):
        raise TypeError(f"kv_heads must be an int, got {type(kv_heads).__name__}")
    # 0 is a multiple of every kv_heads: without this, q with no heads ran (an empty output).
    if heads < 1:
        raise ValueError(f"q has {heads} heads; a call needs at least one query head")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"the number of query heads ({heads}) must be a multiple of the number of "
                         f"kv heads ({kv_heads})")
    if layout.heads not in (1, kv_heads, heads):
        raise ValueError(f"layout has {layout.heads} pattern heads; expected 1, kv_heads={kv_heads} "
                         f"or heads={heads}")


# The kernels take sm_scale / ln(2) in float32: anything larger overflows to inf there.
MAX_SM_SCALE = torch.finfo(torch.float32).max * math.log(2)


def check_scale(sm_scale: float | None) -> None:
    if sm_scale is None:
        return
    if isinstance(sm_scale, torch.Tensor) and sm_scale.numel() == 1 and not (
            sm_scale.dtype.is_complex or sm_scale.dtype == torch.bool):
        sm_scale = sm_scale.item()
    if not isinstance(sm_scale, numbers.Real) or isinstance(sm_scale, bool):
        raise TypeError(f"sm_scale must be a real number or None, got {type(sm_scale).__name__}")
    if not (math.isfinite(sm_scale) and 0 < sm_scale <= MAX_SM_SCALE):
        raise ValueError(f"sm_scale must be a positive finite number (at most {MAX_SM_SCALE:.3g}, "
                         f"float32's range), got {sm_scale}")


def check_seq_dim(seq_dim: int) -> None:
    """``seq_dim`` is the int 1 or 2 (not 1.0, not True)."""
    if not is_int(seq_dim) or seq_dim not in (1, 2):
        raise ValueError(f"seq_dim must be 1 (batch, seq, heads, dim) or 2 (batch, heads, seq, "
                         f"dim), got {seq_dim!r}")


def check_batch(name: str, batch: int) -> None:
    if batch < 1:
        raise ValueError(f"{name} has batch size {batch}; a call needs at least one sequence")


def check_count(name: str, value: int | None, low: int, high: int) -> None:
    """An optional Python int in ``[low, high]`` (None passes)."""
    if value is None:
        return
    if not is_int(value):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def check_config_type(name: str, config: LaunchConfig | None) -> None:
    """A given launch config is a :class:`LaunchConfig` of ints and an impl name, so that its
    rules (:func:`kernels.configs.config_problems`) can be read at all."""
    if config is None:
        return
    if not isinstance(config, LaunchConfig):
        raise TypeError(f"{name} must be a kernels.LaunchConfig or None, got "
                        f"{type(config).__name__} (LaunchConfig.from_dict reads a dict)")
    for field in ("block_m", "block_n", "num_warps", "num_stages"):
        value = getattr(config, field)
        if not is_int(value):
            raise TypeError(f"{name}.{field} must be an int, got {value!r}")
    if not isinstance(config.impl, str):
        raise TypeError(f"{name}.impl must be a str, got {config.impl!r}")


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
