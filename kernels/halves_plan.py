"""Owned steps: a 128-row tile's kv blocks regrouped so that each tile half multiplies only the
blocks its own rows keep (for :mod:`kernels.fwd_halves` and :mod:`kernels.bwd_dq_halves`).

The Gluon forward and dq kernels (:mod:`kernels.fwd_ws`, :mod:`kernels.bwd_dq_ws`) walk the
union of the kv blocks a tile's two 64-row sparse blocks keep, and both consumers multiply every
step and mask the keys their rows do not keep. Where the halves keep different blocks (a random
pattern keeps each block for each half independently) about half of that work is masked: at
density 0.2 the union's products are 0.55 useful (kernels/PERF.md). Owned steps: a step of
blocks both halves keep is taken by both consumers; a step of blocks only one half keeps by
that half's consumer alone, while the other moves on to its own next step, so the two work on
different steps at once. A row then costs its shared steps plus the larger half's own ones.

A consumer holds the stage of its last step until its next step's products are issued, so each
half's steps come at most two apart (one of the other half's between), which three stages
hold. Host side only (CPU, cached on the layout): the plan, its cost, when it pays, the work
items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import TilePlan, tile_plan
from .fwd_ws import BLOCK_M, BOX_N, ITEM_OVERHEAD, split_first_steps
from .layout import BlockLayout
from .schedule import balanced_schedule

# A step's owners: bit 0 the tile's upper 64 rows, bit 1 its lower 64.
UPPER, LOWER, BOTH = 1, 2, 3
# Each plan row's words in the step table: a header (where the upper half's list starts, from
# the row's first word, and its length, then the lower half's), then the two lists, one word a
# step the half owns: (the step's index in the row << 1) | whether its scores need the mask.
HEADER = 4
# Take owned steps when their estimated time is under this share of the union's.
PAYS_BELOW = 0.85
# A consumer waits for a stage it released two steps before; fewer stages would deadlock.
MIN_STAGES = 3
BOX_CHOICES = (1, 2)  # 64-key blocks a step


@dataclass(frozen=True)
class HalvesPlan:
    """Each tile-plan row's blocks regrouped into owned steps of ``boxes`` entries each
    (padding entries have row bits 0, so every key of theirs is masked).

    Row ``r``'s entries are ``kv_block[row_ptr[r]:row_ptr[r+1]]``, a multiple of ``boxes``, step
    ``j`` being the ``boxes`` entries from ``boxes * j``; its words in ``steps`` (see
    ``HEADER``) start at ``step_ptr[r]``.
    """

    boxes: int
    row_ptr: torch.Tensor  # int64 (rows + 1,)
    kv_block: torch.Tensor  # int32 (padded entries,)
    row_bits: torch.Tensor  # int32 (padded entries,)
    step_ptr: torch.Tensor  # int64 (rows,)
    steps: torch.Tensor  # int32 (rows * HEADER + the halves' steps,)


Step = tuple[int, tuple[int, ...], bool]  # owners, entries (-1: padding), needs a mask


def _groups(entries: list[int], size: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """``entries`` in consecutive groups of ``size`` and the ones left over."""
    whole = len(entries) - len(entries) % size
    return [tuple(entries[i:i + size]) for i in range(0, whole, size)], entries[whole:]


def _interleave(first: list, second: list) -> list:
    """first[0], second[0], first[1], second[1], ..., then the longer one's rest."""
    out = []
    for i in range(max(len(first), len(second))):
        out.extend(x[i] for x in (first, second) if i < len(x))
    return out


def _row_steps(bits: list[int], masked: list[bool], boxes: int) -> list[Step]:
    """One row's owned steps.

    Blocks both halves keep come first, ``boxes`` a step, then each half's own blocks, its
    steps alternating with the other half's. With two boxes the odd blocks left of each kind
    share masked steps both halves take, except a single odd block of one half's, which takes
    a step of that half's with padding.
    """
    kinds = {owner: [e for e, b in enumerate(bits) if b == owner] for owner in (BOTH, UPPER, LOWER)}
    grouped = {owner: _groups(entries, boxes) for owner, entries in kinds.items()}

    def step(owner: int, group: tuple[int, ...]) -> Step:
        return owner, group, any(e < 0 or masked[e] for e in group)

    shared = [step(BOTH, group) for group in grouped[BOTH][0]]
    own = {owner: [step(owner, group) for group in grouped[owner][0]] for owner in (UPPER, LOWER)}
    odd = grouped[BOTH][1] + grouped[UPPER][1] + grouped[LOWER][1]  # empty with one box
    if len(odd) == 1 and bits[odd[0]] != BOTH:
        own[bits[odd[0]]].append((bits[odd[0]], (odd[0], -1), True))
    elif odd:
        pairs, rest = _groups(odd, 2)
        shared += [(BOTH, pair, True) for pair in pairs]
        shared += [(BOTH, (rest[0], -1), True)] if rest else []
    steps = shared + _interleave(own[UPPER], own[LOWER])
    # An empty row still takes one step (all padding), as the loader and the union's kernel do.
    return steps or [(BOTH, (-1,) * boxes, True)]


def build_halves_plan(plan: TilePlan, block_size: int, seq_k: int, causal: bool,
                      boxes: int) -> HalvesPlan:
    """Regroup a 128-row tile plan of 64-key blocks into owned steps of ``boxes`` blocks.

    An entry needs a mask for its owners where its block is ragged (past ``seq_k``) or, causal,
    reaches into the tile (the union's plan masks the blocks one half does not keep too; here
    those go to the other half's steps)."""
    row_ptr = plan.row_ptr.cpu().tolist()
    kv_block = plan.kv_block.cpu().tolist()
    row_bits = plan.row_bits.cpu().tolist()
    out_ptr, out_block, out_bits, step_ptr, words = [0], [], [], [], []
    for r in range(len(row_ptr) - 1):
        lo, hi = row_ptr[r], row_ptr[r + 1]
        tile_start = (r % plan.tiles) * BLOCK_M
        blocks, bits = kv_block[lo:hi], row_bits[lo:hi]
        masked = [(b + 1) * block_size > seq_k or (causal and (b + 1) * block_size > tile_start)
                  for b in blocks]
        steps = _row_steps(bits, masked, boxes)
        lists = [[(j << 1) | needs_mask for j, (owner, _, needs_mask) in enumerate(steps)
                  if owner & half] for half in (UPPER, LOWER)]
        for js in lists:
            assert all(0 < (b >> 1) - (a >> 1) <= 2 for a, b in zip(js, js[1:])), steps
        step_ptr.append(len(words))
        words += [HEADER, len(lists[0]), HEADER + len(lists[0]), len(lists[1])]
        words += lists[0] + lists[1]
        for _, group, _ in steps:
            out_block += [blocks[e] if e >= 0 else 0 for e in group]
            out_bits += [bits[e] if e >= 0 else 0 for e in group]
        out_ptr.append(len(out_block))
    return HalvesPlan(boxes, torch.tensor(out_ptr), torch.tensor(out_block, dtype=torch.int32),
                      torch.tensor(out_bits, dtype=torch.int32), torch.tensor(step_ptr),
                      torch.tensor(words, dtype=torch.int32))


def halves_plan(layout: BlockLayout, seq_k: int, boxes: int) -> HalvesPlan:
    """:func:`build_halves_plan` of the layout's 128-row plan, cached on the layout."""
    return layout.cached(("halves_plan", seq_k, boxes),
                         lambda: build_halves_plan(tile_plan(layout, BLOCK_M, seq_k),
                                                   layout.block_size, seq_k, layout.causal,
                                                   boxes))


def halves_cost(plan: TilePlan, boxes: int) -> torch.Tensor:
    """Each tile-plan row's time in owned steps, in steps: its shared steps plus the larger
    half's own ones (the two halves' own steps run side by side), as :func:`_row_steps` makes
    them; counted from the row bits without building the plan."""
    rows = len(plan.row_ptr) - 1
    counts = (plan.row_ptr[1:] - plan.row_ptr[:-1]).cpu().long()
    row = torch.repeat_interleave(torch.arange(rows), counts)
    bits = plan.row_bits.cpu().long()
    n_both, n_upper, n_lower = (torch.bincount(row[bits == b], minlength=rows)
                                for b in (BOTH, UPPER, LOWER))
    if boxes == 1:
        return torch.clamp(n_both + torch.maximum(n_upper, n_lower), min=1).double()
    odd_both, odd_upper, odd_lower = n_both % 2, n_upper % 2, n_lower % 2
    odd = odd_both + odd_upper + odd_lower
    # One odd block of one half's alone takes a step of that half's; else the odd ones share.
    alone = (odd == 1) & (odd_both == 0)
    shared = n_both // 2 + torch.where(alone, 0, (odd + 1) // 2)
    upper = n_upper // 2 + (alone & (odd_upper == 1)).long()
    lower = n_lower // 2 + (alone & (odd_lower == 1)).long()
    return torch.clamp(shared + torch.maximum(upper, lower), min=1).double()


def union_cost(plan: TilePlan, block_size: int, boxes: int) -> torch.Tensor:
    """Each tile-plan row's steps in the union's kernels (half a step less for a split one)."""
    _, _, split = split_first_steps(plan, block_size, boxes)
    counts = (plan.row_ptr[1:] - plan.row_ptr[:-1]).cpu().double()
    return torch.clamp(torch.ceil(counts / boxes), min=1) - 0.5 * split.double()


def halves_pay(layout: BlockLayout, seq_k: int, stages: int, boxes: int) -> bool:
    """Whether owned steps should take a Gluon call of ``stages`` and ``boxes``: 64-key blocks,
    at least three stages, and owned steps whose time is under ``PAYS_BELOW`` of the union's
    (each row with the fixed cost of an item). Never for phi-3's pattern, whose tile halves
    share their blocks."""
    if layout.block_size != BOX_N or boxes not in BOX_CHOICES or stages < MIN_STAGES:
        return False

    def decide() -> bool:
        plan = tile_plan(layout, BLOCK_M, seq_k)
        union = float((union_cost(plan, layout.block_size, boxes) + ITEM_OVERHEAD).sum())
        return float((halves_cost(plan, boxes) + ITEM_OVERHEAD).sum()) < PAYS_BELOW * union

    return layout.cached(("halves_pay", seq_k, boxes), decide)


@dataclass(frozen=True)
class HalvesItems:
    """The persistent programs' work: program ``p`` takes rows ``starts[p]:starts[p+1]`` of
    ``items``, each (item number, first plan entry, entries, the plan row's first step word,
    0), in :func:`kernels.fwd_ws.work_items`'s columns so the union kernels' loaders read
    them."""

    items: torch.Tensor  # int32 (n_items, 5)
    starts: torch.Tensor  # int32 (programs + 1,)
    kv_block: torch.Tensor  # int32
    row_bits: torch.Tensor  # int32
    steps: torch.Tensor  # int32


def halves_items(layout: BlockLayout, seq_k: int, first_tile: int, batch: int, heads: int,
                 boxes: int, programs: int, device: torch.device) -> HalvesItems:
    """Deal the work items (query tile ``w % n_tiles + first_tile`` of batch x head
    ``w // n_tiles``) to up to ``programs`` programs, balanced by their owned steps (cached)."""
    def build() -> HalvesItems:
        plan = halves_plan(layout, seq_k, boxes)
        tiles = math.ceil(seq_k / BLOCK_M)
        cost = halves_cost(tile_plan(layout, BLOCK_M, seq_k), boxes)
        n_tiles = tiles - first_tile
        item = torch.arange((batch * heads) * n_tiles)
        head = (item // n_tiles) % heads
        row = (head // (heads // layout.heads)) * tiles + item % n_tiles + first_tile
        first = plan.row_ptr[row]
        count = plan.row_ptr[row + 1] - first
        sched = balanced_schedule(cost[row] + ITEM_OVERHEAD, min(len(item), programs))
        table = torch.stack([item, first, count, plan.step_ptr[row], torch.zeros_like(item)],
                            dim=1)[sched.order.long()]
        return HalvesItems(table.to(torch.int32).contiguous().to(device), sched.starts.to(device),
                           plan.kv_block.to(device), plan.row_bits.to(device),
                           plan.steps.to(device))

    key = ("halves_items", seq_k, first_tile, batch, heads, boxes, programs, str(device))
    return layout.cached(key, build)
