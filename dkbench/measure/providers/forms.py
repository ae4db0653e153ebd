"""The pattern compiler: one `BlockLayout` into every backend's block-sparse form.

Every form is built from the block pattern itself, never from a dense token mask, so building one
costs memory in blocks, not in token pairs, at any sequence length. All of them start from
`coarse_blocks`: the layout seen through a backend's own (q, kv) block shape, for each query head,
as two bool maps, *full* blocks (every token pair kept, no mask needed) and *partial* blocks
(some pairs kept; the backend masks them per token). Queries are the last ``q_len`` of ``seq_k``
positions, and a backend counts its q blocks from the first query.

The forms:
- `block_index`: counts and ascending indices per row (FlexAttention's ``kv_num_blocks`` /
  ``kv_indices`` and FA4's ``mask_block_cnt`` / ``mask_block_idx``), kv-major for a forward and
  q-major (transposed) for FA4's backward.
- `per_kv_head`: one block map per kv head, FlashInfer's form (its variable-block wrapper).
- `expand_blocks`: a block map back to token pairs, the test oracle for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import BlockLayout, layout_head_index


@dataclass(frozen=True)
class CoarseBlocks:
    """A layout at a (block_q, block_kv) shape: bool maps ``(heads, q_blocks, kv_blocks)``."""

    full: torch.Tensor
    partial: torch.Tensor
    block_q: int
    block_kv: int
    q_len: int
    seq_k: int

    @property
    def kept(self) -> torch.Tensor:
        """Blocks holding at least one kept pair."""
        return self.full | self.partial


def coarse_blocks(layout: BlockLayout, heads: int, kv_heads: int, q_len: int, seq_k: int,
                  block_q: int, block_kv: int, device: torch.device | str | None = None
                  ) -> CoarseBlocks:
    """The layout seen through (block_q, block_kv) blocks, one map per query head.

    Works on a grain that divides the pattern's block, both coarse block sizes and the queries'
    offset, so any block shape works (finer or coarser than the pattern's, or neither); at each
    grain cell the causal diagonal is known exactly, so no pair is counted kept that is not.
    """
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be positive, got ({block_q}, {block_kv})")
    layout.check_seqlen(seq_k, q_len)
    device = torch.device(device) if device is not None else layout.pattern.device
    offset = seq_k - q_len
    bs = layout.block_size
    grain = math.gcd(bs, block_q, block_kv, offset)  # gcd ignores a zero offset
    n_q, n_k = -(-q_len // block_q), -(-seq_k // block_kv)
    q_cells, k_cells = n_q * block_q // grain, n_k * block_kv // grain
    # Absolute start position of each grain cell; cells past the sequence hold no pair.
    q_start = offset + torch.arange(q_cells, device=device) * grain
    k_start = torch.arange(k_cells, device=device) * grain
    q_valid, k_valid = q_start < seq_k, k_start < seq_k
    fine = layout.pattern.to(device)
    q_fine = torch.clamp(q_start // bs, max=fine.shape[1] - 1)
    k_fine = torch.clamp(k_start // bs, max=fine.shape[2] - 1)
    cells = fine[:, q_fine][:, :, k_fine] & (q_valid[:, None] & k_valid[None, :])
    whole = cells & ((q_start + grain <= seq_k)[:, None] & (k_start + grain <= seq_k)[None, :])
    if layout.causal:
        # A cell keeps some pair when its first key is at or before its last query, and every
        # pair when its last key is at or before its first query.
        cells = cells & (k_start[None, :] <= q_start[:, None] + grain - 1)
        whole = whole & (k_start[None, :] + grain - 1 <= q_start[:, None])
    fq, fk = block_q // grain, block_kv // grain

    def pool(mask: torch.Tensor, reduce: str) -> torch.Tensor:
        view = mask.view(mask.shape[0], n_q, fq, n_k, fk)
        return getattr(getattr(view, reduce)(dim=4), reduce)(dim=2)

    any_kept, all_kept = pool(cells, "any"), pool(whole, "all")
    head_map = layout_head_index(heads, kv_heads, layout.heads).to(device)
    full = all_kept[head_map]
    return CoarseBlocks(full, any_kept[head_map] & ~full, block_q, block_kv, q_len, seq_k)


def block_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``(heads, rows)`` and indices ``(heads, rows, cols)`` of the kept columns of each row,
    in ascending order and packed left (the rest of a row is padding, never read), both int32."""
    cols = mask.shape[-1]
    counts = mask.sum(dim=-1, dtype=torch.int32)
    position = torch.arange(cols, device=mask.device)
    # Kept blocks first, each group in ascending order: sort on (not kept, index).
    order = torch.argsort((~mask).to(torch.int64) * cols + position, dim=-1)
    return counts, order.to(torch.int32)


@dataclass(frozen=True)
class BlockSparseIndex:
    """Full and partial blocks as counts and indices, batch-broadcast ``(1, heads, rows, ...)``:
    rows are q blocks (``q_major=False``, a forward's form) or kv blocks (a backward's form)."""

    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor
    block_q: int
    block_kv: int


def sparse_index(blocks: CoarseBlocks, kv_major: bool = True) -> BlockSparseIndex:
    """`block_index` of the full and partial maps: per q block (``kv_major``, rows list kv
    blocks) or per kv block (rows list q blocks, FA4's backward)."""
    def per_row(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts, index = block_index(mask if kv_major else mask.transpose(1, 2))
        return counts[None], index[None]

    full_count, full_index = per_row(blocks.full)
    partial_count, partial_index = per_row(blocks.partial)
    return BlockSparseIndex(full_count, full_index, partial_count, partial_index,
                            blocks.block_q, blocks.block_kv)


def per_kv_head(mask: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A per-query-head block map ``(heads, ...)`` as one map per kv head ``(kv_heads, ...)``, for
    a backend that masks per kv head; ValueError when the query heads of a group differ."""
    grouped = mask.view(kv_heads, mask.shape[0] // kv_heads, *mask.shape[1:])
    if not bool((grouped == grouped[:, :1]).all()):
        raise ValueError("the query heads of a GQA group keep different blocks; a map per kv "
                         "head needs one pattern per group")
    return grouped[:, 0].contiguous()


# Zero rows and columns past a per-head table's last block (see `per_head_table`).
TABLE_SLACK_TOKENS = 256


def per_head_table(layout: BlockLayout, heads: int, kv_heads: int, device: torch.device,
                   dtype: torch.dtype = torch.bool, slack_tokens: int = TABLE_SLACK_TOKENS,
                   at_least: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """The pattern per query head, ``(heads, q_blocks + slack, k_blocks + slack)``, for a
    backend's per-token mask function to read. A tile past the last query or key still asks about
    its padding positions before discarding them; the zero slack keeps those reads inside.
    ``at_least`` (heads, q blocks, k blocks, slack included) pads the table further with zeros,
    so that tables of several cases can share one shape."""
    fine = layout.pattern.to(device)[layout_head_index(heads, kv_heads, layout.heads).to(device)]
    slack = -(-slack_tokens // layout.block_size)
    shape = (heads, fine.shape[1] + slack, fine.shape[2] + slack)
    table = torch.zeros(*(max(n, m) for n, m in zip(shape, at_least)), dtype=dtype,
                        device=device)
    table[:heads, :fine.shape[1], :fine.shape[2]] = fine
    return table


def expand_blocks(mask: torch.Tensor, block_q: int, block_kv: int, q_len: int,
                  seq_k: int) -> torch.Tensor:
    """A block map ``(heads, q_blocks, kv_blocks)`` as token pairs ``(heads, q_len, seq_k)``."""
    expanded = mask.repeat_interleave(block_q, dim=1).repeat_interleave(block_kv, dim=2)
    return expanded[:, :q_len, :seq_k]
