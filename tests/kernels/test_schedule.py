"""The persistent forward's work schedule: every item once, balanced, and the right plan rows."""

import pytest
import torch

from kernels import fwd_ws, local_stride_layout
from kernels.schedule import balanced_schedule


def _programs(sched) -> list[list[int]]:
    starts = sched.starts.tolist()
    order = sched.order.tolist()
    return [order[starts[p]:starts[p + 1]] for p in range(len(starts) - 1)]


def test_every_item_once_in_order() -> None:
    costs = torch.rand(500, generator=torch.Generator().manual_seed(0)) * 20 + 1
    sched = balanced_schedule(costs, 7)
    assert sched.order.dtype == sched.starts.dtype == torch.int32
    per_program = _programs(sched)
    assert sorted(i for items in per_program for i in items) == list(range(500))
    for items in per_program:
        assert items == sorted(items)  # each program walks its items in their natural order


def test_equal_costs_deal_round_robin() -> None:
    sched = balanced_schedule(torch.full((10,), 3.0), 4)
    assert _programs(sched) == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]


def test_totals_within_one_item() -> None:
    # Growing costs, as causal tiles have: round robin leaves the last programs the most work.
    costs = torch.arange(1, 201, dtype=torch.float64) % 37 + 1
    totals = [costs[items].sum().item() for items in _programs(balanced_schedule(costs, 9))]
    assert max(totals) - min(totals) <= costs.max().item()
    round_robin = [costs[p::9].sum().item() for p in range(9)]
    assert max(totals) < max(round_robin)


def test_phi3_8k_better_balanced_than_round_robin() -> None:
    """The shipped phi-3 forward at 8k: the busiest of 132 programs under round robin has 4%
    more steps than the mean; balanced, under 1%."""
    layout = local_stride_layout(32, 8192, 64, 16, 8, head_sliding_offset=1)
    work = fwd_ws.work_items(layout, 8192, 0, 8, 32, 2, 132, torch.device("cpu"))
    split = work.items[:, 4].double()
    steps = (torch.clamp(torch.ceil(work.items[:, 2].double() / 2), min=1) - split / 2
             + fwd_ws.ITEM_OVERHEAD)
    starts = work.starts.tolist()
    balanced = torch.stack([steps[starts[p]:starts[p + 1]].sum() for p in range(132)])
    by_item = torch.empty_like(steps)
    by_item[work.items[:, 0].long()] = steps
    round_robin = torch.stack([by_item[p::132].sum() for p in range(132)])
    assert (round_robin.max() / round_robin.mean()).item() > 1.03
    assert (balanced.max() / balanced.mean()).item() < 1.01


def _kept(layout, w: int, n_tiles: int, first_tile: int, heads: int, n_blocks: int):
    """Item ``w``'s (upper, lower) query blocks' kept-kv-block rows, straight from the pattern."""
    tile = w % n_tiles + first_tile
    pattern_head = ((w // n_tiles) % heads) // (heads // layout.heads)
    rows = layout.pattern[pattern_head, 2 * tile:2 * tile + 2, :n_blocks]
    if len(rows) == 1:  # the tile's lower query block is past the end
        rows = torch.cat([rows, torch.zeros_like(rows)])
    return rows[0], rows[1]


@pytest.mark.parametrize("seq_q", [640, 1000])
def test_work_items_carry_their_plan_rows(seq_q: int) -> None:
    """Each row names an item once and carries that item's kept blocks, counted here straight
    from the pattern: GQA heads, two pattern heads, queries fewer than keys, a ragged end. Where
    the tile has a block only its upper 64 rows keep and one only its lower 64 keep, the two
    open the row (split first step); the other entries follow in the plan's order."""
    seq_k, heads, batch, block = 1000, 4, 2, 64
    layout = local_stride_layout(heads, 1024, block, 3, 4, num_kv_heads=2, head_sliding_offset=1)
    first_tile = (seq_k - seq_q) // fwd_ws.BLOCK_M
    work = fwd_ws.work_items(layout, seq_k, first_tile, batch, heads, 2, 5, torch.device("cpu"))
    plan = fwd_ws.tile_plan(layout, fwd_ws.BLOCK_M, seq_k)
    tiles = -(-seq_k // fwd_ws.BLOCK_M)
    n_tiles = tiles - first_tile
    assert sorted(work.items[:, 0].tolist()) == list(range(batch * heads * n_tiles))
    assert work.starts[0] == 0 and work.starts[-1] == len(work.items)
    n_blocks = -(-seq_k // block)
    splits = 0
    for w, first, count, unmasked, split in work.items.tolist():
        upper, lower = _kept(layout, w, n_tiles, first_tile, heads, n_blocks)
        assert count == int((upper | lower).sum())
        blocks = work.kv_block[first:first + count].tolist()
        plan_blocks = plan.kv_block[first:first + count].tolist()
        assert sorted(blocks) == sorted(plan_blocks)
        only_upper = (upper & ~lower).nonzero().flatten().tolist()
        only_lower = (lower & ~upper).nonzero().flatten().tolist()
        if split:
            splits += 1
            assert blocks[0] in only_upper and blocks[1] in only_lower
            assert blocks[2:] == [b for b in plan_blocks if b not in blocks[:2]]
            assert work.row_bits[first:first + 2].tolist() == [0b01, 0b10]
        else:
            assert blocks == plan_blocks
            assert not (only_upper and only_lower and count > 2)
        full = (upper & lower)
        full_row = int(plan.n_full[(w // n_tiles % heads) // (heads // layout.heads) * tiles
                                   + w % n_tiles + first_tile])
        assert unmasked == full_row + 2 * split and unmasked <= count
        # Every entry past the unmasked ones either is kept by one half only or needs a mask.
        assert all(bool(full[b]) for b in blocks[2 * split:unmasked]), blocks
    assert splits > 0  # the case exercises the split


@pytest.mark.parametrize("boxes, block", [(1, 64), (2, 128)])
def test_no_split_without_64_key_blocks_in_128_key_steps(boxes: int, block: int) -> None:
    layout = local_stride_layout(4, 1024, block, 3, 2, head_sliding_offset=1)
    work = fwd_ws.work_items(layout, 1024, 0, 1, 4, boxes, 3, torch.device("cpu"))
    plan = fwd_ws.tile_plan(layout, fwd_ws.BLOCK_M, 1024)
    assert not work.items[:, 4].any()
    assert torch.equal(work.kv_block, plan.kv_block) and torch.equal(work.row_bits, plan.row_bits)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty 1-d"):
        balanced_schedule(torch.zeros(0), 3)
    with pytest.raises(ValueError, match="programs must be positive"):
        balanced_schedule(torch.ones(4), 0)
