"""The `flash_attn` package (FlashAttention-2/3), when installed, on the dense (causal) problem: its plain, varlen
and KV-cache functions."""

from __future__ import annotations

import torch

from kernels import BlockLayout

from ...spec.sweep import Case, Sweep
from .base import Prepared, Provider, refuse_fp8


class FlashAttn(Provider):
    name = "flash_attn"
    computes = "dense"
    modes = ("fwd", "bwd", "fwd_bwd", "prefill_varlen", "decode")

    def unavailable(self, device: torch.device) -> str | None:
        try:
            # flash-attn-4 installs a flash_attn package too, holding only flash_attn.cute.
            from flash_attn import flash_attn_func  # noqa: F401
        except ImportError:
            return ("the flash_attn package (FlashAttention-2/3) is not installed; "
                    "FlashAttention-4 is the fa4 provider")
        if device.type != "cuda":
            return "flash_attn needs a CUDA GPU"
        return None

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        refuse_fp8(case, "the flash_attn package's fp8 forward (FlashAttention-3's Hopper build) "
                         "is not wired into dkbench; see the bf16 rows")
        import flash_attn

        causal = case.causal
        if case.mode == "prefill_varlen":
            max_len = case.seqlen

            def varlen(q, k, v, cu_seqlens, *_):
                return flash_attn.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len,
                                                         max_len, softmax_scale=scale,
                                                         causal=causal)

            return Prepared(varlen)
        if case.mode == "decode":
            def decode(q, k_cache, v_cache, cache_seqlens, *_):
                # The new token's k/v are already in the cache; it attends to all of it.
                out = flash_attn.flash_attn_with_kvcache(q[:, None], k_cache, v_cache,
                                                         cache_seqlens=cache_seqlens,
                                                         softmax_scale=scale, causal=True)
                return out[:, 0]

            return Prepared(decode)

        def attn(q, k, v):
            # flash_attn takes (batch, seq, heads, dim) and aligns causal masks bottom-right.
            out = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), softmax_scale=scale, causal=causal)
            return out.transpose(1, 2)

        return Prepared(attn)
