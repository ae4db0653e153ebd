"""Context parallelism: any split of the keys into block-aligned segments, each run by
sparse_attention_partition and merged by combine_attn_partitions, is attention over the whole
sequence (sparse_attention and the dense reference, output and log-sum-exp)."""

import itertools
import math

import pytest
import torch

from kernels import (
    LaunchConfig,
    combine_attn_partitions,
    dense_layout,
    layout_head_index,
    reference_attention,
    sparse_attention,
    sparse_attention_partition,
    token_mask,
)
from kernels.common import build_tile_plan
from tests.kernels.cases import make_layout
from tests.tolerances import assert_verbose_close, rel_tol

SEQ = 150  # ragged: not a multiple of any block size used here

CASES = [
    # family, causal, heads, kv_heads, block, dtype, key segment bounds, (q_start, q_end),
    # seq_dim, config
    ("hetero", True, 4, 2, 16, torch.float32, (0, 64, SEQ), (0, SEQ), 1, None),
    ("hetero", True, 4, 4, 16, torch.bfloat16, (0, 16, 96, SEQ), (100, SEQ), 1, None),  # end chunk
    ("random", False, 4, 2, 16, torch.float32, (0, 32, 48, 128, SEQ), (37, 101), 1, None),  # middle
    # Tiles of 32 rows over blocks of 16 (row bits), a middle chunk starting inside a tile.
    ("dense_heads", True, 4, 2, 16, torch.float32, (0, 48, 64, 112, SEQ), (40, 120), 1,
     LaunchConfig(32, 16, 4, 1)),
    ("homo", False, 2, 1, 32, torch.bfloat16, (0, 96, SEQ), (130, SEQ), 2, None),
    # Blocks of 32 walked in 16-row tiles and 16-key steps.
    ("hetero", True, 4, 2, 32, torch.float32, (0, 32, 64, SEQ), (50, 140), 2,
     LaunchConfig(16, 16, 4, 1)),
]


def _inputs(heads: int, kv_heads: int, dtype: torch.dtype, seq_dim: int, device: str):
    shape = lambda h: (1, SEQ, h, 32) if seq_dim == 1 else (1, h, SEQ, 32)
    return tuple(torch.randn(shape(h), device=device, dtype=dtype)
                 for h in (heads, kv_heads, kv_heads))


def _rows(t: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
    return t.narrow(dim, start, end - start)


def _run_partitions(q, k, v, layout, bounds, q_start, q_end, seq_dim, config):
    q_part = _rows(q, seq_dim, q_start, q_end)
    results = [sparse_attention_partition(q_part, _rows(k, seq_dim, a, b), _rows(v, seq_dim, a, b),
                                          layout, q_start, a, seq_dim=seq_dim, config=config)
               for a, b in itertools.pairwise(bounds)]
    return [r[0] for r in results], [r[1] for r in results]


@pytest.mark.parametrize("case", CASES, ids=lambda c: (
    f"{c[0]}-{'causal' if c[1] else 'bidir'}-h{c[2]}kv{c[3]}-bs{c[4]}-{str(c[5])[6:]}-"
    f"{len(c[6]) - 1}seg-q{c[7][0]}:{c[7][1]}-sd{c[8]}"))
def test_merged_partitions_equal_the_whole_sequence(case, device, poison_outputs):
    family, causal, heads, kv_heads, bs, dtype, bounds, (q_start, q_end), seq_dim, config = case
    layout = make_layout(family, heads, kv_heads, SEQ, bs, causal)
    q, k, v = _inputs(heads, kv_heads, dtype, seq_dim, device)
    outs, lses = _run_partitions(q, k, v, layout, bounds, q_start, q_end, seq_dim, config)
    out, lse = combine_attn_partitions(outs, lses, seq_dim=seq_dim)
    assert out.dtype == dtype and lse.dtype == torch.float32

    # Rows are independent: the queries' rows of the whole sequence are the expected result.
    whole, whole_lse = sparse_attention(q, k, v, layout, seq_dim=seq_dim, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, layout, seq_dim=seq_dim, return_lse=True)
    tol = rel_tol(dtype, device)
    assert_verbose_close(out, _rows(whole, seq_dim, q_start, q_end), tol, "merged vs whole")
    assert_verbose_close(out, _rows(ref, seq_dim, q_start, q_end), tol, "merged vs reference")
    assert_verbose_close(lse, whole_lse[:, :, q_start:q_end], tol, "lse vs whole")
    assert_verbose_close(lse, ref_lse[:, :, q_start:q_end], tol, "lse vs reference")


def _segment_reference(q, k, v, layout, q_start: int, k_start: int, k_end: int):
    """Float64 attention of q (the queries from q_start) over the keys [k_start, k_end) of the
    whole sequence's token mask; rows that see none of them give 0 and -inf."""
    heads, kv_heads = q.shape[2], k.shape[2]
    mask = token_mask(layout, SEQ)[layout_head_index(heads, kv_heads, layout.heads)]
    mask = mask[:, q_start:q_start + q.shape[1], k_start:k_end]
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k[:, k_start:k_end], v[:, k_start:k_end]))
    kd, vd = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (kd, vd))
    scores = (qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[3])).masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(lse.isneginf(), 0.0, lse)[..., None])
    return (probs @ vd).transpose(1, 2), lse


@pytest.mark.parametrize("causal,q_start,k_start,k_end", [
    (True, 37, 48, 112),  # block-aligned; the rows before key 48 see none of it
    (True, 64, 0, 70),  # ends inside a block, before the queries do
    (False, 20, 16, 99),
])
def test_each_partition_is_attention_over_its_own_keys(causal, q_start, k_start, k_end, device,
                                                       poison_outputs):
    """One segment alone, against a dense float64 softmax over its keys only: rows that see
    none of them (causal: the segment lies after them) are 0 with lse -inf."""
    layout = make_layout("hetero", 4, 2, SEQ, 16, causal)
    q, k, v = _inputs(4, 2, torch.float32, 1, device)
    out, lse = sparse_attention_partition(q[:, q_start:], k[:, k_start:k_end],
                                          v[:, k_start:k_end], layout, q_start, k_start)
    ref, ref_lse = _segment_reference(q[:, q_start:], k, v, layout.to(device), q_start, k_start,
                                      k_end)
    blind = ref_lse.isneginf()
    assert blind.any() == (causal and k_start > q_start)
    assert torch.equal(lse.isneginf(), blind)
    assert torch.count_nonzero(out.transpose(1, 2)[blind]) == 0
    tol = rel_tol(torch.float32, device)
    assert_verbose_close(out.transpose(1, 2)[~blind], ref.transpose(1, 2)[~blind], tol)
    assert_verbose_close(lse[~blind], ref_lse[~blind], tol, "lse")


def test_a_segment_after_every_query_is_empty_and_merges_away(device, poison_outputs):
    layout = make_layout("hetero", 4, 2, SEQ, 16)
    q, k, v = _inputs(4, 2, torch.bfloat16, 1, device)
    bounds, q_end = (0, 32, 64, SEQ), 60
    outs, lses = _run_partitions(q, k, v, layout, bounds, 0, q_end, 1, None)
    assert torch.isneginf(lses[-1]).all() and torch.count_nonzero(outs[-1]) == 0
    out, lse = combine_attn_partitions(outs, lses)
    whole, whole_lse = sparse_attention(q, k, v, layout, return_lse=True)
    tol = rel_tol(torch.bfloat16, device)
    assert_verbose_close(out, whole[:, :q_end], tol)
    assert_verbose_close(lse, whole_lse[:, :, :q_end], tol, "lse")


def test_the_partition_plan_is_the_whole_plan_restricted_to_the_segment(device):
    """Per (head, query tile), the kv blocks a partition walks are the whole sequence's blocks
    inside the segment."""
    layout = make_layout("random", 4, 4, SEQ, 16).to(device)
    for block_m in (16, 32, 64):
        whole = build_tile_plan(layout, block_m, SEQ)
        for k_start, k_end in ((0, 48), (48, 128), (128, SEQ)):
            part = build_tile_plan(layout, block_m, k_end, SEQ, k_start)
            assert part.tiles == whole.tiles
            for r in range(whole.row_ptr.numel() - 1):
                mine = part.kv_block[part.row_ptr[r]:part.row_ptr[r + 1]].tolist()
                all_kv = whole.kv_block[whole.row_ptr[r]:whole.row_ptr[r + 1]].tolist()
                assert sorted(mine) == sorted(b for b in all_kv if k_start <= b * 16 < k_end), r


def test_combine_matches_a_hand_computed_merge():
    # Three rows: both segments, only the second, neither.
    out1 = torch.tensor([1.0, 7.0, 0.0])[None, :, None, None].expand(1, 3, 1, 2)
    out2 = torch.tensor([4.0, 2.0, 0.0])[None, :, None, None].expand(1, 3, 1, 2)
    lse1 = torch.tensor([[[math.log(2), -math.inf, -math.inf]]])
    lse2 = torch.tensor([[[math.log(6), math.log(5), -math.inf]]])
    out, lse = combine_attn_partitions([out1, out2], (lse1, lse2))
    expected = torch.tensor([(2 * 1.0 + 6 * 4.0) / 8, 2.0, 0.0])[None, :, None, None].expand(1, 3, 1, 2)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, torch.tensor([[[math.log(8), math.log(5), -math.inf]]]))
    # The same in (batch, heads, seq, dim), in bfloat16: merged in float32, returned in bf16.
    out, lse = combine_attn_partitions([o.transpose(1, 2).bfloat16() for o in (out1, out2)],
                                       [lse1, lse2], seq_dim=2)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected.transpose(1, 2))


def test_combine_of_one_segment_is_that_segment():
    out1 = torch.randn(2, 5, 3, 16)
    lse1 = torch.randn(2, 3, 5)
    out, lse = combine_attn_partitions([out1], [lse1])
    torch.testing.assert_close(out, out1)
    torch.testing.assert_close(lse, lse1)


def _partition_args(device):
    layout = dense_layout(4, 16)
    q = torch.randn(1, 20, 2, 16, device=device)
    k = torch.randn(1, 16, 2, 16, device=device)
    return q, k, k.clone(), layout


@pytest.mark.parametrize("change,error,match", [
    (dict(k_start=8), ValueError, "k_start must be a multiple of the layout's block size 16, got 8"),
    (dict(q_start=-1), ValueError, "q_start must be >= 0"),
    (dict(k_start=-16), ValueError, "k_start must be >= 0"),
    (dict(q_start=1.0), TypeError, "q_start must be an int"),
    (dict(q_start=50), ValueError, "too few for queries up to position 70 and keys up to 16"),
    (dict(k_start=64), ValueError, "too few for queries up to position 20 and keys up to 80"),
    (dict(v_seg=torch.randn(1, 15, 2, 16)), ValueError, "k_seg and v_seg must have one shape"),
    (dict(k_seg=torch.randn(1, 16, 2, 32), v_seg=torch.randn(1, 16, 2, 32)), ValueError,
     "q and k_seg must have one batch size and head_dim"),
    (dict(k_seg=torch.randn(1, 0, 2, 16), v_seg=torch.randn(1, 0, 2, 16)), ValueError,
     "at least one position each, got 20 queries and 0 keys"),
    (dict(v_seg=torch.randn(1, 16, 2, 16, dtype=torch.float16)), TypeError, "must share a dtype"),
    (dict(seq_dim=3), ValueError, "seq_dim must be 1"),
    (dict(q=torch.randn(1, 20, 2, 16, requires_grad=True)), ValueError, "q requires grad"),
    (dict(config=LaunchConfig(128, 64, 4, 3, "gluon")), ValueError, "impl='triton'"),
    (dict(config=LaunchConfig(16, 32)), ValueError, "invalid launch config"),
    (dict(layout="dense"), TypeError, "layout must be a BlockLayout"),
])
def test_partition_refuses_bad_inputs(change, error, match, device):
    q, k, v, layout = _partition_args(device)
    args = dict(q=q, k_seg=k, v_seg=v, layout=layout, q_start=0, k_start=0)
    args.update({name: t.to(device) if isinstance(t, torch.Tensor) else t
                 for name, t in change.items()})
    with pytest.raises(error, match=match):
        sparse_attention_partition(**args)


@pytest.mark.parametrize("outs,lses,error,match", [
    ([], [], ValueError, "outs is empty"),
    ([torch.zeros(1, 4, 2, 8)], [], ValueError, "lses is empty"),
    (torch.zeros(1, 4, 2, 8), [torch.zeros(1, 2, 4)], TypeError, "outs must be a list or tuple"),
    ([torch.zeros(1, 4, 2, 8)], [torch.zeros(1, 2, 4)] * 2, ValueError, "one entry per segment"),
    ([torch.zeros(1, 4, 2, 8), torch.zeros(1, 5, 2, 8)], [torch.zeros(1, 2, 4)] * 2, ValueError,
     r"outs\[1\] has shape \(1, 5, 2, 8\), expected \(1, 4, 2, 8\)"),
    ([torch.zeros(1, 4, 2, 8)] * 2, [torch.zeros(1, 2, 4), torch.zeros(1, 4, 2)], ValueError,
     r"lses\[1\] has shape \(1, 4, 2\), expected \(1, 2, 4\)"),
    ([torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8, dtype=torch.float16)],
     [torch.zeros(1, 2, 4)] * 2, TypeError, r"outs\[1\] has dtype torch.float16"),
    ([torch.zeros(1, 4, 2, 8)], [torch.zeros(1, 2, 4, dtype=torch.int64)], TypeError,
     r"lses\[0\] has dtype torch.int64"),
    ([torch.zeros(4, 2, 8)], [torch.zeros(1, 2, 4)], ValueError, r"outs\[0\] must be a 4-D"),
    ([torch.zeros(1, 4, 2, 8)], ["lse"], TypeError, r"lses\[0\] must be a torch.Tensor"),
])
def test_combine_refuses_bad_inputs(outs, lses, error, match):
    with pytest.raises(error, match=match):
        combine_attn_partitions(outs, lses)


def test_combine_checks_seq_dim():
    with pytest.raises(ValueError, match="seq_dim must be 1"):
        combine_attn_partitions([torch.zeros(1, 4, 2, 8)], [torch.zeros(1, 2, 4)], seq_dim=0)
    # seq_dim=2 reads (batch, heads, seq, dim): these lses are then the wrong shape.
    with pytest.raises(ValueError, match=r"lses\[0\] has shape \(1, 2, 4\), expected \(1, 4, 2\)"):
        combine_attn_partitions([torch.zeros(1, 4, 2, 8)], [torch.zeros(1, 2, 4)], seq_dim=2)
