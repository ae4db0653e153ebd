"""Output allocation for every kernel launcher, in one place so tests can poison all outputs."""

from __future__ import annotations

import torch


def new_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised output buffer on ``like``'s device."""
    return torch.empty(shape, device=like.device, dtype=dtype)
