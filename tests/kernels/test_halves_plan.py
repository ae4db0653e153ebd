"""The owned-step plan (kernels/halves_plan.py) of the Gluon forward and dq kernels, on the CPU.

The kernels run on Hopper only (tests/kernels/test_gpu_halves.py checks their numbers);
here the plan is checked for what they rely on, and walked the way the forward walks it (each
half's own steps, their masks only where a step's word says so) against the reference: a step
left unmasked that needs a mask, a block lost or counted twice, reads the wrong keys.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import BlockLayout, local_stride_layout, random_layout, reference_attention
from kernels.common import tile_plan
from kernels.halves_plan import (
    build_halves_plan,
    halves_cost,
    halves_items,
    halves_pay,
    halves_plan,
)
from kernels.layout import dense_layout
from tests.kernels.cases import make_qkv
from tests.tolerances import assert_verbose_close

BLOCK = 64


def _own_lists(plan, r: int) -> list[list[tuple[int, bool]]]:
    """Row ``r``'s (step, needs a mask) lists, upper half then lower."""
    base = int(plan.step_ptr[r])
    words = plan.steps.tolist()
    out = []
    for half in (0, 1):
        start, count = words[base + 2 * half], words[base + 2 * half + 1]
        out.append([(w >> 1, bool(w & 1)) for w in words[base + start:base + start + count]])
    return out


def _layouts() -> list[tuple[BlockLayout, int]]:
    sparse = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(3)) < 0.3
    sparse[:, :, 0] = True
    sparse[:, 5, 1:] = False  # a query block that keeps one block, its tile's other half many
    sparse[:, 6:8, 1:] = False  # a tile whose halves keep one block, the same one
    return [
        (random_layout(4, 16, BLOCK, 0.05, seed=1), 16 * BLOCK),
        (random_layout(4, 16, BLOCK, 0.3, seed=2), 16 * BLOCK),
        (random_layout(4, 16, BLOCK, 0.7, seed=3), 15 * BLOCK + 17),  # ragged last block
        (random_layout(2, 12, BLOCK, 0.4, seed=4, causal=False), 12 * BLOCK - 5),
        (BlockLayout.from_pattern(sparse, BLOCK, causal=False, warn_kv_cache=False),
         12 * BLOCK),
        (local_stride_layout(4, 16 * BLOCK, BLOCK, 4, 4, head_sliding_offset=1), 16 * BLOCK),
        (dense_layout(16, BLOCK), 13 * BLOCK + 1),
    ]


@pytest.mark.parametrize("boxes", [1, 2])
@pytest.mark.parametrize("case", range(len(_layouts())))
def test_each_half_owns_every_block_it_keeps_once_and_masks_where_needed(case: int,
                                                                          boxes: int) -> None:
    layout, seq_k = _layouts()[case]
    union = tile_plan(layout, 2 * BLOCK, seq_k)
    plan = build_halves_plan(union, BLOCK, seq_k, layout.causal, boxes)
    assert plan.boxes == boxes
    rows = len(union.row_ptr) - 1
    assert len(plan.step_ptr) == rows
    for r in range(rows):
        lo, hi = int(plan.row_ptr[r]), int(plan.row_ptr[r + 1])
        assert (hi - lo) % boxes == 0 and hi > lo
        steps = (hi - lo) // boxes
        blocks, bits = plan.kv_block[lo:hi].tolist(), plan.row_bits[lo:hi].tolist()
        u_lo, u_hi = int(union.row_ptr[r]), int(union.row_ptr[r + 1])
        tile_start = (r % union.tiles) * 2 * BLOCK
        for half, own in enumerate(_own_lists(plan, r)):
            js = [j for j, _ in own]
            assert all(0 <= j < steps for j in js)
            # A consumer never waits more than one step of the other half's between its own.
            assert all(0 < b - a <= 2 for a, b in zip(js, js[1:]))
            kept = sorted(b for b, m in zip(union.kv_block[u_lo:u_hi].tolist(),
                                            union.row_bits[u_lo:u_hi].tolist()) if m >> half & 1)
            seen = sorted(blocks[boxes * j + c] for j in js for c in range(boxes)
                          if bits[boxes * j + c] >> half & 1)
            assert seen == kept
            for j, needs_mask in own:
                for c in range(boxes):
                    b, m = blocks[boxes * j + c], bits[boxes * j + c]
                    partial = (b + 1) * BLOCK > seq_k or not m >> half & 1
                    diagonal = layout.causal and (b + 1) * BLOCK > tile_start
                    assert needs_mask or not (partial or diagonal), (r, half, j)
        # Every step has an owner.
        assert sorted(set(j for own in _own_lists(plan, r) for j, _ in own)) == list(range(steps))


@pytest.mark.parametrize("boxes", [1, 2])
@pytest.mark.parametrize("case", range(len(_layouts())))
def test_halves_cost_counts_the_plan_it_builds(case: int, boxes: int) -> None:
    layout, seq_k = _layouts()[case]
    union = tile_plan(layout, 2 * BLOCK, seq_k)
    plan = build_halves_plan(union, BLOCK, seq_k, layout.causal, boxes)
    expected = []
    for r in range(len(plan.step_ptr)):
        upper, lower = ({j for j, _ in own} for own in _own_lists(plan, r))
        expected.append(len(upper & lower) + max(len(upper - lower), len(lower - upper)))
    assert halves_cost(union, boxes).tolist() == expected


def test_owned_steps_pay_for_random_patterns_only() -> None:
    seq_k = 64 * BLOCK
    rand = random_layout(4, 64, BLOCK, 0.2, seed=0)
    phi3 = local_stride_layout(4, seq_k, BLOCK, 16, 8, head_sliding_offset=1)
    for boxes in (1, 2):
        assert halves_pay(rand, seq_k, stages=3, boxes=boxes)
        assert halves_pay(rand, seq_k, stages=4, boxes=boxes)
        assert not halves_pay(rand, seq_k, stages=2, boxes=boxes)  # it would deadlock
        assert not halves_pay(phi3, seq_k, stages=3, boxes=boxes)  # its halves share blocks
        assert not halves_pay(dense_layout(64, BLOCK), seq_k, stages=3, boxes=boxes)
        assert not halves_pay(random_layout(4, 32, 2 * BLOCK, 0.2), seq_k, stages=3,
                              boxes=boxes)
    assert not halves_pay(rand, seq_k, stages=3, boxes=4)


def _walk(q, k, v, layout: BlockLayout, sm_scale: float, boxes: int) -> torch.Tensor:
    """The kernel's arithmetic over the owned-step plan, in float64: (batch, seq_q, heads, dim).

    Keys past the sequence read the padding's values, as the kernel's copies would read the
    next memory or zeros, so an unmasked step that needs a mask changes the result."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    items = halves_items(layout, seq_k, (seq_k - seq_q) // (2 * BLOCK), batch, heads, boxes, 4,
                         torch.device("cpu"))
    plan = halves_plan(layout, seq_k, boxes)
    tiles = math.ceil(seq_k / (2 * BLOCK))
    pad = math.ceil(seq_k / BLOCK) * BLOCK - seq_k
    k_pad = torch.cat([k.double(), 1e3 * torch.randn(batch, pad, kv_heads, dim).double()], 1)
    v_pad = torch.cat([v.double(), 1e3 * torch.randn(batch, pad, kv_heads, dim).double()], 1)
    q_offset = seq_k - seq_q
    out = torch.full((batch, seq_q, heads, dim), float("nan"), dtype=torch.float64)
    first_tile = q_offset // (2 * BLOCK)
    n_tiles = tiles - first_tile
    for w, first, count, step_word, _ in items.items.tolist():
        tile, zh = w % n_tiles + first_tile, w // n_tiles
        z, h = zh // heads, zh % heads
        r = (h // (heads // layout.heads)) * tiles + tile
        assert step_word == int(plan.step_ptr[r]) and first == int(plan.row_ptr[r])
        for half, own in enumerate(_own_lists(plan, r)):
            rows = tile * 2 * BLOCK + half * BLOCK + torch.arange(BLOCK)
            scores, values = [], []
            for j, needs_mask in own:
                for c in range(boxes):
                    e = first + boxes * j + c
                    keys = int(plan.kv_block[e]) * BLOCK + torch.arange(BLOCK)
                    qh = q[z, (rows - q_offset).clamp(0, seq_q - 1), h].double()
                    s = qh @ k_pad[z, keys, h // (heads // kv_heads)].T * sm_scale
                    if needs_mask:
                        row_end = min((tile + 1) * 2 * BLOCK, seq_k) if layout.causal else seq_k
                        keep = ((keys < seq_k) & (keys < row_end))[None, :].expand_as(s)
                        if layout.causal:
                            keep = keep & (keys[None, :] <= rows[:, None])
                        bit = (int(plan.row_bits[e]) >> (rows // BLOCK - 2 * tile)) & 1
                        keep = keep & (bit[:, None] == 1)
                        s = torch.where(keep, s, float("-inf"))
                    scores.append(s)
                    values.append(v_pad[z, keys, h // (heads // kv_heads)])
            if not scores:
                continue
            p = torch.softmax(torch.cat(scores, 1), 1)
            o = p @ torch.cat(values, 0)
            stored = (rows >= q_offset) & (rows - q_offset < seq_q)
            out[z, rows[stored] - q_offset, h] = o[stored]
    return out


@pytest.mark.parametrize("case", [
    # (layout, seq_q, seq_k, heads, kv_heads)
    ("random 0.3", 16 * BLOCK, 16 * BLOCK, 4, 2),
    ("random 0.6, ragged", 15 * BLOCK + 17, 15 * BLOCK + 17, 4, 4),
    ("random 0.3, fewer queries", 6 * BLOCK, 16 * BLOCK, 4, 1),
    ("random 0.4, not causal", 12 * BLOCK - 5, 12 * BLOCK - 5, 2, 1),
])
@pytest.mark.parametrize("boxes", [1, 2])
def test_walking_the_plan_as_the_kernel_does_gives_the_reference(case, boxes: int) -> None:
    name, seq_q, seq_k, heads, kv_heads = case
    density = float(name.split()[1].rstrip(","))
    causal = "not causal" not in name
    layout = random_layout(heads, math.ceil(seq_k / BLOCK), BLOCK, density, seed=7,
                           causal=causal)
    q, k, v = make_qkv(2, seq_q, seq_k, heads, kv_heads, 32, torch.float32, "cpu")
    expected = reference_attention(q, k, v, layout, sm_scale=0.2)
    assert_verbose_close(_walk(q, k, v, layout, 0.2, boxes), expected, 1e-10)


def test_the_items_cover_every_tile_of_every_head_once() -> None:
    layout = random_layout(4, 16, BLOCK, 0.3, seed=5)
    items = halves_items(layout, 16 * BLOCK, 0, 2, 8, 2, 5, torch.device("cpu"))
    assert sorted(items.items[:, 0].tolist()) == list(range(2 * 8 * 8))
    assert items.starts.tolist()[0] == 0 and items.starts.tolist()[-1] == len(items.items)


def _row_by_row(plan, block_size: int, seq_k: int, causal: bool, boxes: int):
    """The owned-step plan built one row at a time with lists, as its rules read: the oracle
    for the tensor form. Returns (row_ptr, kv_block, row_bits, step_ptr, steps) as lists."""
    both, upper, lower = 3, 1, 2

    def groups(entries, size):
        whole = len(entries) - len(entries) % size
        return [tuple(entries[i:i + size]) for i in range(0, whole, size)], entries[whole:]

    def row_steps(bits, masked):
        kinds = {o: [e for e, b in enumerate(bits) if b == o] for o in (both, upper, lower)}
        grouped = {o: groups(entries, boxes) for o, entries in kinds.items()}

        def step(owner, group):
            return owner, group, any(e < 0 or masked[e] for e in group)

        shared = [step(both, g) for g in grouped[both][0]]
        own = {o: [step(o, g) for g in grouped[o][0]] for o in (upper, lower)}
        odd = grouped[both][1] + grouped[upper][1] + grouped[lower][1]
        if len(odd) == 1 and bits[odd[0]] != both:
            own[bits[odd[0]]].append((bits[odd[0]], (odd[0], -1), True))
        elif odd:
            pairs, rest = groups(odd, 2)
            shared += [(both, pair, True) for pair in pairs]
            shared += [(both, (rest[0], -1), True)] if rest else []
        mixed = []
        for i in range(max(len(own[upper]), len(own[lower]))):
            mixed += [own[o][i] for o in (upper, lower) if i < len(own[o])]
        return shared + mixed or [(both, (-1,) * boxes, True)]

    row_ptr, kv_block, row_bits = (t.tolist() for t in (plan.row_ptr, plan.kv_block,
                                                          plan.row_bits))
    out_ptr, out_block, out_bits, step_ptr, words = [0], [], [], [], []
    for r in range(len(row_ptr) - 1):
        blocks, bits = kv_block[row_ptr[r]:row_ptr[r + 1]], row_bits[row_ptr[r]:row_ptr[r + 1]]
        tile_start = (r % plan.tiles) * 2 * block_size
        masked = [(b + 1) * block_size > seq_k or (causal and (b + 1) * block_size > tile_start)
                  for b in blocks]
        steps = row_steps(bits, masked)
        lists = [[(j << 1) | m for j, (o, _, m) in enumerate(steps) if o & half]
                 for half in (upper, lower)]
        step_ptr.append(len(words))
        words += [4, len(lists[0]), 4 + len(lists[0]), len(lists[1])] + lists[0] + lists[1]
        for _, group, _ in steps:
            out_block += [blocks[e] if e >= 0 else 0 for e in group]
            out_bits += [bits[e] if e >= 0 else 0 for e in group]
        out_ptr.append(len(out_block))
    return out_ptr, out_block, out_bits, step_ptr, words


@pytest.mark.parametrize("boxes", [1, 2])
@pytest.mark.parametrize("density", [0.03, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("causal", [True, False])
def test_the_tensor_form_builds_the_row_by_row_plan(boxes: int, density: float,
                                                     causal: bool) -> None:
    cases = [(random_layout(6, 40, BLOCK, density, seed=11, causal=causal), 40 * BLOCK),
             (random_layout(3, 23, BLOCK, density, seed=12, causal=causal), 22 * BLOCK + 9)]
    cases += [(layout, seq_k) for layout, seq_k in _layouts() if layout.causal == causal]
    for layout, seq_k in cases:
        union = tile_plan(layout, 2 * BLOCK, seq_k)
        plan = build_halves_plan(union, BLOCK, seq_k, causal, boxes)
        got = [t.tolist() for t in (plan.row_ptr, plan.kv_block, plan.row_bits, plan.step_ptr,
                                    plan.steps)]
        assert got == list(_row_by_row(union, BLOCK, seq_k, causal, boxes))
