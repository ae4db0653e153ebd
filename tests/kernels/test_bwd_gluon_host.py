"""The host side of the backward's Gluon kernels, on any machine: the dk/dv kernel's deal of work
items and its aligned copy of the row statistics (the kernels themselves run on Hopper only:
tests/kernels/test_gpu_bwd_gluon.py)."""

import math

import pytest
import torch

from kernels import bwd_dkdv_ws, local_stride_layout, random_layout
from kernels.columns import column_plan


@pytest.mark.parametrize("seq_q, seq_k", [(777, 777), (333, 1001), (64, 64)])
def test_row_statistics_sit_at_absolute_positions_on_aligned_rows(seq_q, seq_k) -> None:
    lse = torch.randn(2, 3, seq_q)
    delta = torch.randn(2, 3, seq_q)
    stats = bwd_dkdv_ws.row_statistics(lse, delta, seq_k)
    stride = stats.shape[2]
    assert stats.shape == (2, 6, stride) and stride % 4 == 0 and stride - 4 < seq_k <= stride
    offset = seq_k - seq_q
    # lse in log2 units: the kernel's exp2 takes it so.
    assert torch.equal(stats[0, :, offset:seq_k], lse.reshape(6, seq_q) * math.log2(math.e))
    assert torch.equal(stats[1, :, offset:seq_k], delta.reshape(6, seq_q))
    # Rows before the first query and the padding read as zeros, never as another row's.
    assert not stats[:, :, :offset].any() and not stats[:, :, seq_k:].any()
    # Each plane is what a flat copy reads: packed, so row r of head zh is at zh * stride + r.
    assert stats[0].is_contiguous() and stats[1].is_contiguous()


@pytest.mark.parametrize("layout, seq, heads, kv_heads", [
    (local_stride_layout(8, 2048, 64, 4, 4, num_kv_heads=2, head_sliding_offset=1), 2048, 8, 2),
    (random_layout(4, 13, 64, 0.3, seed=3, causal=False), 777, 4, 4),
    (local_stride_layout(4, 1024, 128, 2, 3), 1024, 8, 2),  # one pattern, heads share it
])
@pytest.mark.parametrize("programs", [1, 3, 132])
def test_dkdv_items_deal_every_item_once_balanced_by_steps(layout, seq, heads, kv_heads,
                                                          programs) -> None:
    batch = 2
    cols = column_plan(layout, seq, seq)
    work = bwd_dkdv_ws.dkdv_items(layout, cols, seq, seq, batch, heads, kv_heads, programs,
                                  torch.device("cpu"))
    n_tiles = math.ceil(seq / bwd_dkdv_ws.KV_TILE)
    n_items = batch * kv_heads * n_tiles
    # Two pipelines a program: an even number of schedule rows, none past the programs.
    pipes = len(work.starts) - 1
    assert pipes % 2 == 0 and pipes // 2 <= programs
    assert work.starts[0] == 0 and work.starts[-1] == n_items
    assert torch.all(work.starts[1:] >= work.starts[:-1])
    assert sorted(work.items.tolist()) == list(range(n_items))

    # Each item's steps, counted from the column plan as the kernel walks it.
    col_ptr = cols.col_ptr.long()
    sub = layout.block_size // bwd_dkdv_ws.Q_TILE
    q_per_kv, per_pattern = heads // kv_heads, heads // layout.heads

    def steps(item: int) -> int:
        tile, zkv = item % n_tiles, item // n_tiles
        kv_block = tile // (layout.block_size // bwd_dkdv_ws.KV_TILE)
        total = 0
        for h in range((zkv % kv_heads) * q_per_kv, (zkv % kv_heads + 1) * q_per_kv):
            row = (h // per_pattern) * cols.kv_blocks + kv_block
            total += int(col_ptr[row + 1] - col_ptr[row]) * sub
        return total

    cost = [sum(steps(int(w)) + bwd_dkdv_ws.ITEM_OVERHEAD
                for w in work.items[work.starts[p]:work.starts[p + 1]]) for p in range(pipes)]
    largest = max(steps(w) for w in range(n_items)) + bwd_dkdv_ws.ITEM_OVERHEAD
    # The least-loaded-first deal ends with every pipeline within one item of the others.
    busy = [c for c in cost if c > 0]
    assert max(busy) - min(busy) <= largest + 1e-9
