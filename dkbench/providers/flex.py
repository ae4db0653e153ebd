"""FlexAttention (torch.compile'd) with a block mask built from the case's own pattern.

The block mask comes straight from the block pattern through `BlockMask.from_kv_blocks`, never
from a token-level mask, so building it costs O(blocks) memory at any sequence length. Flex's
block is 128 (smaller ones fail to compile on Hopper, see the README); a 128-block is "full" when
every finer pattern block inside it is kept and it lies wholly below the diagonal, and "partial"
(checked per token by `mask_mod`) otherwise.
"""

from __future__ import annotations

import functools

import torch

from kernels import BlockLayout
from kernels.reference import layout_head_index

from ..spec import Case, Sweep
from .base import Prepared, Provider, Unsupported

FLEX_BLOCK = 128


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def build_block_mask(layout: BlockLayout, heads: int, kv_heads: int, q_len: int, seq_k: int,
                     device: torch.device):
    """A FlexAttention BlockMask for this layout; queries are the last q_len positions."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = layout.block_size
    flex_bs = max(FLEX_BLOCK, bs)
    factor = flex_bs // bs
    offset = seq_k - q_len
    if offset % flex_bs:
        raise Unsupported(f"q_len={q_len} leaves queries unaligned to FlexAttention's {flex_bs} blocks")
    nb = -(-seq_k // bs)
    nf = -(-seq_k // flex_bs)
    pattern = torch.zeros(layout.heads, nf * factor, nf * factor, dtype=torch.bool, device=device)
    pattern[:, :nb, :nb] = layout.pattern[:, :nb, :nb].to(device)
    coarse = pattern.view(layout.heads, nf, factor, nf, factor)
    any_kept = coarse.any(dim=4).any(dim=2)
    all_kept = coarse.all(dim=4).all(dim=2)
    fj = torch.arange(nf, device=device)
    full = all_kept & ((fj[None, :] + 1) * flex_bs <= seq_k)  # ragged last block is partial
    if layout.causal:
        full &= fj[None, :] < fj[:, None]
    partial = any_kept & ~full
    first_q = offset // flex_bs
    head_map = layout_head_index(heads, kv_heads, layout.heads).to(device)

    def to_kv(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = mask[:, first_q:][head_map][None]  # (1, heads, q_blocks, kv_blocks)
        counts = mask.sum(dim=-1, dtype=torch.int32)
        # Kept blocks first, in ascending order: sort on (not kept, index).
        order = torch.argsort((~mask).to(torch.int32) * nf + fj, dim=-1).to(torch.int32)
        return counts, order

    kv_num, kv_idx = to_kv(partial)
    full_num, full_idx = to_kv(full)
    fine = layout.pattern.to(device)
    causal = layout.causal

    def mask_mod(b, h, q_idx, kv_idx):
        q_abs = q_idx + offset
        keep = fine[head_map[h], q_abs // bs, kv_idx // bs]
        return keep & (kv_idx <= q_abs) if causal else keep

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=flex_bs,
                                    mask_mod=mask_mod, seq_lengths=(q_len, seq_k))


class Flex(Provider):
    name = "flex"
    computes = "pattern"

    def unavailable(self, device: torch.device) -> str | None:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as exc:
            return f"FlexAttention is not in this torch: {exc}"
        if device.type != "cuda":
            return "FlexAttention is timed on CUDA GPUs only (its CPU path compiles for minutes)"
        return None

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        block_mask = build_block_mask(layout, case.heads, case.kv_heads, case.q_len, case.seqlen,
                                      device)
        # Each case's mask_mod closes over new tensors and recompiles; past dynamo's recompile
        # limit it would fall back to eager flex, which materialises the scores. Start afresh.
        torch._dynamo.reset()
        _compiled_flex.cache_clear()
        flex = _compiled_flex()
        gqa = case.heads != case.kv_heads

        def attn(q, k, v):
            return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)

        return Prepared(attn, f"block{max(FLEX_BLOCK, layout.block_size)}", "")
