"""The `flash_attn` package, when installed, on the dense (causal) problem."""

from __future__ import annotations

import torch

from kernels import BlockLayout

from ..spec import Case, Sweep
from .base import Prepared, Provider


class FlashAttn(Provider):
    name = "flash_attn"
    computes = "dense"

    def unavailable(self, device: torch.device) -> str | None:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "the flash_attn package is not installed"
        if device.type != "cuda":
            return "flash_attn needs a CUDA GPU"
        return None

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        from flash_attn import flash_attn_func

        causal = case.causal

        def attn(q, k, v):
            # flash_attn takes (batch, seq, heads, dim) and aligns causal masks bottom-right.
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  softmax_scale=scale, causal=causal)
            return out.transpose(1, 2)

        return Prepared(attn)
