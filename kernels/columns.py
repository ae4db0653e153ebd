"""The pattern's column form for the backward's dk/dv kernels (:mod:`kernels.bwd`,
:mod:`kernels.bwd_dkdv_ws`): for each (pattern head, kv block), the query blocks that keep it,
unmasked ones first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import index_table
from .layout import BlockLayout


@dataclass(frozen=True)
class ColumnPlan:
    """Kept query blocks per (pattern head, kv block), unmasked ones first in each row.

    Query blocks wholly before the first query (``seq_q < seq_k``) are left out. An entry needs a
    mask when it is the causal diagonal, the ragged last block, or straddles the first query.
    """

    col_ptr: torch.Tensor  # int32 (pattern_heads * kv_blocks + 1,)
    n_full: torch.Tensor  # int32 (pattern_heads * kv_blocks,)
    q_block: torch.Tensor  # int32 (nnz,)
    kv_blocks: int


def build_column_plan(layout: BlockLayout, seq_q: int, seq_k: int) -> ColumnPlan:
    bs = layout.block_size
    nb = math.ceil(seq_k / bs)
    offset = seq_k - seq_q
    pattern = layout.pattern[:, :nb, :nb]
    device = pattern.device
    qb = torch.arange(nb, device=device)
    has_queries = (qb + 1) * bs > offset
    kept = pattern.transpose(1, 2) & has_queries[None, None, :]  # (heads, kv block, q block)
    partial_q = ((qb + 1) * bs > seq_k) | (qb * bs < offset)
    masked = partial_q[None, None, :].expand_as(kept)
    if layout.causal:
        masked = masked | torch.eye(nb, dtype=torch.bool, device=device)[None]
    table = index_table(kept, masked)
    return ColumnPlan(table.row_ptr, table.n_full, table.col.to(torch.int32), nb)


def column_plan(layout: BlockLayout, seq_q: int, seq_k: int) -> ColumnPlan:
    """:func:`build_column_plan`, cached on the layout per lengths and device."""
    return layout.cached(("bwd_col_plan", seq_q, seq_k, layout.pattern.device),
                         lambda: build_column_plan(layout, seq_q, seq_k))
