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
from .fwd_ws import BLOCK_M, BOX_N, ITEM_OVERHEAD, split_steps
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


def _rank_in_row(entry_row: torch.Tensor, row_ptr: torch.Tensor, hit: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each entry's rank among the hits of its row (entries grouped by row, in order), and each
    row's number of hits."""
    seen = torch.zeros(len(hit) + 1, dtype=torch.long)
    seen[1:] = torch.cumsum(hit.long(), 0)
    before_row = seen[row_ptr[:-1]]
    return seen[:-1] - before_row[entry_row], seen[row_ptr[1:]] - before_row


def _interleaved(i: torch.Tensor, theirs: torch.Tensor, second: bool) -> torch.Tensor:
    """Where a list's ``i``-th element lands when it alternates with a list of ``theirs``
    elements (the first list's element first, ``second`` says which this is), the longer
    one's rest after."""
    return torch.where(i < theirs, 2 * i + int(second), theirs + i)


def build_halves_plan(plan: TilePlan, block_size: int, seq_k: int, causal: bool,
                      boxes: int) -> HalvesPlan:
    """Regroup a 128-row tile plan of 64-key blocks into owned steps of ``boxes`` blocks.

    Each row's steps: the blocks both halves keep, ``boxes`` a step, then each half's own
    blocks, its steps alternating with the other half's (the upper half's first). With two
    boxes the odd blocks left of each kind (a shared one, an upper one, a lower one, in that
    order) share masked steps after the shared ones, except a single odd block of one half's,
    which takes a last step of that half's with padding. An empty row still takes one step (all
    padding), as the loader and the union's kernel do.

    An entry needs a mask for its owners where its block is ragged (past ``seq_k``) or, causal,
    reaches into the tile (the union's plan masks the blocks one half does not keep too; here
    those go to the other half's steps). Built with tensor operations over every entry at once:
    a plan at 64k tokens has millions."""
    row_ptr = plan.row_ptr.cpu().long()
    kv_block, bits = plan.kv_block.cpu().long(), plan.row_bits.cpu().long()
    rows = len(row_ptr) - 1
    entry_row = torch.repeat_interleave(torch.arange(rows), row_ptr[1:] - row_ptr[:-1])
    if not bool(((bits >= UPPER) & (bits <= BOTH)).all()):
        raise ValueError("a tile plan entry is kept by neither half")
    block_end = (kv_block + 1) * block_size
    masked = block_end > seq_k
    if causal:
        masked |= block_end > (entry_row % plan.tiles) * BLOCK_M

    rank = torch.zeros_like(kv_block)
    kept = {}
    for owner in (BOTH, UPPER, LOWER):
        hit = bits == owner
        owner_rank, kept[owner] = _rank_in_row(entry_row, row_ptr, hit)
        rank = torch.where(hit, owner_rank, rank)
    odd = {owner: kept[owner] % boxes for owner in kept}  # zero with one box
    n_odd = odd[BOTH] + odd[UPPER] + odd[LOWER]
    alone = (n_odd == 1) & (odd[BOTH] == 0)
    n_shared = kept[BOTH] // boxes + torch.where(alone, 0, (n_odd + 1) // 2)
    n_own = {owner: kept[owner] // boxes + (alone & (odd[owner] == 1)).long()
             for owner in (UPPER, LOWER)}
    n_steps = torch.clamp(n_shared + n_own[UPPER] + n_own[LOWER], min=1)

    # Each entry's step in its row and its place in the step. A whole group's entries go by
    # their rank; a half's lone odd block is its last own step; the other odd blocks fill the
    # steps after the whole shared ones, two a step.
    rows_n = {owner: n[entry_row] for owner, n in n_own.items()}
    whole_kept = torch.stack([torch.zeros(rows, dtype=torch.long)]
                             + [kept[owner] - odd[owner] for owner in (UPPER, LOWER, BOTH)], 1)
    whole = rank < whole_kept[entry_row, bits]
    own_step = n_shared[entry_row] + torch.where(
        bits == UPPER, _interleaved(rank // boxes, rows_n[LOWER], False),
        _interleaved(rank // boxes, rows_n[UPPER], True))
    step = torch.where(bits == BOTH, rank // boxes, own_step)
    slot = torch.where(whole, rank % boxes, 0)
    leftover = ~whole & ~alone[entry_row]
    odd_place = (torch.where(bits == BOTH, 0, odd[BOTH][entry_row])
                 + torch.where(bits == LOWER, odd[UPPER][entry_row], 0))
    step = torch.where(leftover, (kept[BOTH] // boxes)[entry_row] + odd_place // 2, step)
    slot = torch.where(leftover, odd_place % 2, slot)

    step_base = torch.zeros(rows + 1, dtype=torch.long)
    step_base[1:] = torch.cumsum(n_steps, 0)
    total = int(step_base[-1])
    out_entry = (step_base[entry_row] + step) * boxes + slot
    out_block = torch.zeros(total * boxes, dtype=torch.int32)
    out_bits = torch.zeros(total * boxes, dtype=torch.int32)
    out_block[out_entry] = kv_block.to(torch.int32)
    out_bits[out_entry] = bits.to(torch.int32)

    # Each step's owners and whether its scores need the mask: a padding entry, a masked
    # block, or odd blocks of different owners sharing it.
    at = step_base[entry_row] + step
    real = torch.zeros(total, dtype=torch.long).index_add_(0, at, torch.ones_like(at))
    flagged = torch.zeros(total, dtype=torch.long).index_add_(0, at, (masked | ~whole).long())
    needs_mask = (real < boxes) | (flagged > 0)
    step_row = torch.repeat_interleave(torch.arange(rows), n_steps)
    j = torch.arange(total) - step_base[step_row]
    after_shared = j - n_shared[step_row]
    upper_n, lower_n = n_own[UPPER][step_row], n_own[LOWER][step_row]
    paired = after_shared < 2 * torch.minimum(upper_n, lower_n)
    upper_turn = torch.where(paired, after_shared % 2 == 0, upper_n > lower_n)
    owner = torch.where(j < n_shared[step_row], BOTH, torch.where(upper_turn, UPPER, LOWER))
    owner = torch.where((n_shared + n_own[UPPER] + n_own[LOWER] == 0)[step_row], BOTH, owner)

    # The step table: each row's header, then the upper half's words, then the lower half's.
    word = (j << 1) | needs_mask.long()
    in_list = {half: (owner & half) != 0 for half in (UPPER, LOWER)}
    listed = {half: torch.bincount(step_row[in_list[half]], minlength=rows)
              for half in (UPPER, LOWER)}
    for half in (UPPER, LOWER):
        js = j[in_list[half]]
        same_row = step_row[in_list[half]][1:] == step_row[in_list[half]][:-1]
        gaps = (js[1:] - js[:-1])[same_row]
        assert bool(((gaps > 0) & (gaps <= 2)).all()), "a half's steps more than two apart"
    row_words = HEADER + listed[UPPER] + listed[LOWER]
    step_ptr = torch.cumsum(row_words, 0) - row_words
    words = torch.zeros(int(row_words.sum()), dtype=torch.long)
    header = torch.stack([torch.full((rows,), HEADER), listed[UPPER], HEADER + listed[UPPER],
                          listed[LOWER]], dim=1)
    words[(step_ptr[:, None] + torch.arange(HEADER)).flatten()] = header.flatten()
    for half, first in ((UPPER, torch.full((rows,), HEADER)), (LOWER, HEADER + listed[UPPER])):
        place, _ = _rank_in_row(step_row, step_base, in_list[half])
        rows_of = step_row[in_list[half]]
        words[step_ptr[rows_of] + first[rows_of] + place[in_list[half]]] = word[in_list[half]]
    return HalvesPlan(boxes, step_base * boxes, out_block, out_bits, step_ptr,
                      words.to(torch.int32))


def halves_plan(layout: BlockLayout, seq_k: int, boxes: int) -> HalvesPlan:
    """:func:`build_halves_plan` of the layout's 128-row plan, cached on the layout."""
    return layout.cached(("halves_plan", seq_k, boxes),
                         lambda: build_halves_plan(tile_plan(layout, BLOCK_M, seq_k),
                                                   layout.block_size, seq_k, layout.causal,
                                                   boxes))


def halves_cost(plan: TilePlan, boxes: int) -> torch.Tensor:
    """Each tile-plan row's time in owned steps, in steps: its shared steps plus the larger
    half's own ones (the two halves' own steps run side by side), as :func:`build_halves_plan` makes
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


def union_cost(plan: TilePlan, split: torch.Tensor, boxes: int) -> torch.Tensor:
    """Each tile-plan row's steps in the union's kernels, half a step less for a row whose first
    step is split (``split``, from :func:`kernels.fwd_ws.split_steps`)."""
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
        _, _, split = split_steps(layout, seq_k, boxes)
        union = float((union_cost(plan, split, boxes) + ITEM_OVERHEAD).sum())
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
