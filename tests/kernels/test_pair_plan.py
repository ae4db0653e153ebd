"""The Gluon fused backward's work plan off the GPU (`kernels/bwd_fused_ws.py`): every 64-key
box of each kv head in exactly one pair, each row's entries exactly the query blocks that keep
either box (with which), unmasked ones first, and the pairing's waste on phi-3's pattern."""

import math

import pytest
import torch

from kernels import local_stride_layout
from kernels.bwd_fused_ws import BOX, build_pair_plan, max_stages, pair_boxes, shared_bytes
from kernels.columns import column_plan
from tests.kernels.cases import PHI3, make_layout


def _brute_force_rows(layout, seq_q, seq_k, heads, kv_heads, boxes):
    """{(head, pair): {query block: bits}} from the pattern, box by box."""
    bs = layout.block_size
    nb, n_boxes = math.ceil(seq_k / bs), math.ceil(seq_k / BOX)
    per_pattern, q_per_kv = heads // layout.heads, heads // kv_heads
    rows = {}
    for h in range(heads):
        for j in range(boxes.shape[1]):
            entry = {}
            for qb in range(nb):
                if (qb + 1) * bs <= seq_k - seq_q:  # wholly before the first query
                    continue
                bits = 0
                for side in range(2):
                    box = int(boxes[h // q_per_kv, j, side])
                    if box < n_boxes and layout.pattern[h // per_pattern, qb, box * BOX // bs]:
                        bits |= 1 << side
                if bits:
                    entry[qb] = bits
            rows[h, j] = entry
    return rows


@pytest.mark.parametrize("case", [
    # (family, causal, seq_q, seq_k, heads, kv_heads, block)
    ("random", True, 1100, 1100, 4, 2, 64),  # ragged: an odd box out
    ("hetero", True, 300, 1000, 8, 4, 64),  # queries are the last 300
    ("random", True, 1024, 1024, 4, 2, 128),  # both boxes of a pair in one block
    ("random", False, 777, 777, 4, 2, 64),
    ("dense", True, 640, 640, 2, 1, 64),
    ("homo", True, 100, 100, 4, 1, 64),  # shorter than one pair
], ids=str)
def test_plan_rows_are_the_blocks_that_keep_either_box(case):
    family, causal, sq, sk, h, hkv, bs = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    plan = build_pair_plan(layout, sq, sk, h, hkv)
    n_boxes = math.ceil(sk / BOX)
    # Every real box once per kv head; the rest of the table is "no box".
    for g in range(hkv):
        counts = torch.bincount(plan.boxes[g].flatten().long(), minlength=n_boxes + 1)
        assert (counts[:n_boxes] == 1).all(), (g, counts)
    want = _brute_force_rows(layout, sq, sk, h, hkv, plan.boxes)
    nb = math.ceil(sk / bs)
    for (head, j), entries in want.items():
        r = head * plan.pairs + j
        first, last = int(plan.row_ptr[r]), int(plan.row_ptr[r + 1])
        got = {int(plan.q_block[e]): int(plan.bits[e]) for e in range(first, last)}
        assert got == entries, (head, j)
        # Unmasked entries first: both boxes kept, off the diagonal, whole and after the first
        # query.
        for e in range(first, first + int(plan.n_full[r])):
            qb = int(plan.q_block[e])
            assert int(plan.bits[e]) == 3
            assert (qb + 1) * bs <= sk and qb * bs >= sk - sq
            if causal:
                assert all(int(b) * BOX // bs != qb for b in plan.boxes[head // (h // hkv), j])
        assert int(plan.n_full[r]) <= last - first
    assert plan.q_block.max() < nb


def test_boxes_of_one_block_pair_as_they_stand():
    kept = torch.rand(2, 40, 7) < 0.5
    boxes = pair_boxes(kept, same_block=True)
    assert boxes.tolist() == [[[0, 1], [2, 3], [4, 5], [6, 7]]] * 2  # 7: no box


def test_a_box_pairs_with_the_one_whose_rows_it_shares():
    # Rows of boxes 0 and 3 alike, 1 and 2 alike: pairing by likeness, not by place.
    a, b = torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1, 1])
    kept = torch.stack([a, b, b, a], dim=1).bool()[None]  # (1, rows, boxes)
    assert pair_boxes(kept, same_block=False).tolist() == [[[0, 3], [1, 2]]]


@pytest.mark.parametrize("seqlen", [8192, 16384])
def test_phi3_pairs_waste_little(seqlen):
    """The steps of the pairs against the kept (query step, 64-key) pairs: phi-3's vertical
    blocks pair with their like eight blocks on, not their neighbours (which would waste a
    third at 8k)."""
    layout = local_stride_layout(max_seq_len=seqlen, **PHI3)
    plan = build_pair_plan(layout, seqlen, seqlen, 32, 8)
    kept = int(column_plan(layout, seqlen, seqlen).col_ptr[-1])
    assert 1.0 <= 2 * int(plan.row_ptr[-1]) / kept < 1.2


def test_off_hopper_the_kernel_says_why():
    from kernels.bwd_fused_ws import refusal

    layout = make_layout("hetero", 4, 2, 256, 64)
    q, do = torch.randn(1, 4, 256, 128), torch.randn(1, 4, 256, 128)
    k, v = torch.randn(1, 2, 256, 128), torch.randn(1, 2, 256, 128)
    assert "Hopper" in refusal(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, do.bfloat16())


def test_stages_fit_shared_memory():
    assert max_stages(128) == 2 and max_stages(64) == 4
    for d in (64, 128):
        assert shared_bytes(d, max_stages(d)) <= 232448
    assert shared_bytes(128, 3) > 232448
