"""The forward kernel against the float64 reference on fresh random inputs, outputs poisoned."""

import pytest
import torch

from kernels import LaunchConfig, reference_attention, sparse_attention
from kernels.fwd import build_tile_plan
from tests.kernels.cases import make_layout, make_qkv
from tests.tolerances import assert_verbose_close, rel_tol

# (family, causal, batch, seq_q, seq_k, heads, kv_heads, dim, block, dtype, seq_dim, contiguous, config)
CASES = [
    ("homo", True, 2, 128, 128, 2, 2, 64, 32, torch.float32, 1, True, None),
    ("hetero", True, 1, 200, 200, 4, 2, 64, 32, torch.float16, 1, True, None),      # ragged, GQA
    ("hetero", False, 1, 200, 200, 4, 4, 64, 32, torch.float32, 2, True, None),     # bidirectional
    ("dense_heads", True, 1, 160, 160, 4, 2, 80, 32, torch.float32, 1, False, None),  # dim 80
    ("random", True, 1, 96, 224, 2, 1, 64, 32, torch.float32, 2, True, None),       # q shorter, MQA
    ("random", False, 1, 77, 190, 4, 2, 48, 16, torch.float16, 1, False, None),     # q shorter, bidir
    ("dense", True, 1, 130, 130, 2, 2, 96, 64, torch.float32, 1, True, None),       # dim 96
    # tiles wider than the sparse block (bit-masked rows) and narrower than it
    ("hetero", True, 1, 250, 250, 4, 2, 64, 16, torch.float32, 1, True, LaunchConfig(64, 16, 4, 1)),
    ("random", False, 1, 150, 250, 2, 2, 64, 16, torch.float16, 2, True, LaunchConfig(32, 16, 4, 1)),
    ("hetero", True, 1, 192, 192, 2, 1, 32, 64, torch.float32, 1, True, LaunchConfig(16, 16, 4, 1)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'causal' if c[1] else 'bidir'}-"
                         f"q{c[3]}k{c[4]}-h{c[5]}kv{c[6]}-d{c[7]}-bs{c[8]}-{str(c[9])[6:]}")
def test_forward_matches_reference(case, device, poison_outputs, tile_loads):
    family, causal, batch, sq, sk, h, hkv, d, bs, dtype, seq_dim, contig, config = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(batch, sq, sk, h, hkv, d, dtype, device, seq_dim, contig)
    scale = 0.3 if family == "random" else None
    out, lse = sparse_attention(q, k, v, layout, sm_scale=scale, seq_dim=seq_dim, return_lse=True,
                                config=config)
    ref, ref_lse = reference_attention(q, k, v, layout, sm_scale=scale, seq_dim=seq_dim,
                                       return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert_verbose_close(out, ref, rel_tol(dtype, device), "out")
    assert_verbose_close(lse, ref_lse, rel_tol(dtype, device) / 2, "lse")


def test_bf16_forward(device, poison_outputs):
    # bf16 dots are upcast in the interpreter (FACTS.md); on a GPU they run natively.
    layout = make_layout("hetero", 2, 2, 128, 32)
    q, k, v = make_qkv(1, 128, 128, 2, 2, 64, torch.bfloat16, device)
    out = sparse_attention(q, k, v, layout)
    assert_verbose_close(out, reference_attention(q, k, v, layout), rel_tol(torch.bfloat16, device))


def test_dropped_blocks_do_not_matter(device):
    # Changing keys in dropped blocks must not change the output; changing kept ones must.
    layout = make_layout("hetero", 2, 2, 192, 32)
    q, k, v = make_qkv(1, 192, 192, 2, 2, 32, torch.float32, device)
    out = sparse_attention(q, k, v, layout)
    dropped = ~layout.pattern[0, 5]
    kb = int(dropped.nonzero()[0])
    k2, v2 = k.clone(), v.clone()
    k2[:, kb * 32:(kb + 1) * 32, 0] += 5.0
    v2[:, kb * 32:(kb + 1) * 32, 0] += 5.0
    out2 = sparse_attention(q, k2, v2, layout)
    rows = slice(5 * 32, 6 * 32)
    torch.testing.assert_close(out2[:, rows, 0], out[:, rows, 0], rtol=0, atol=0)
    assert not torch.allclose(out2[:, kb * 32:(kb + 1) * 32, 0], out[:, kb * 32:(kb + 1) * 32, 0])


def test_tile_plan_orders_full_blocks_first():
    layout = make_layout("hetero", 2, 2, 200, 32)
    plan = build_tile_plan(layout, 64, 200)
    assert plan.tiles == 4
    for row in range(2 * plan.tiles):
        start, end = int(plan.row_ptr[row]), int(plan.row_ptr[row + 1])
        n_full = int(plan.n_full[row])
        tile = row % plan.tiles
        for e in range(start, end):
            kv_end = (int(plan.kv_block[e]) + 1) * 32
            needs_mask = kv_end > tile * 64 or kv_end > 200 or int(plan.row_bits[e]) != 3 and tile < 3
            if e < start + n_full:
                assert not needs_mask, (row, e)


def test_tile_descriptors_only_where_strides_allow(device):
    from kernels import common

    if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("tensor descriptors need Hopper or newer")
    packed = torch.randn(1, 40, 3, 4, 64, device=device)  # (batch, seq, qkv, heads, dim)
    k = packed[:, :, 1].transpose(1, 2)  # a strided (batch, heads, seq, dim) view
    desc = common.tile_descriptor(k, 16, 64)
    assert desc is not None and list(desc.strides) == list(k.stride())
    # fp16 rows of 20 elements are 40 bytes: not 16-byte aligned, so the pointer path.
    assert common.tile_descriptor(torch.randn(1, 2, 40, 20, device=device).half(), 16, 32) is None
    assert common.tile_descriptor(k.expand(2, -1, -1, -1), 16, 64) is None  # a zero batch stride
    assert common.tile_descriptors(16, 64, k, k.transpose(2, 3)) is None  # last stride not 1
    assert common.tile_descriptor(k, 16, 64, tma=False) is None
    assert common.tile_descriptors(16, 64, k, k, tma=False) is None
    assert common.tile_descriptors(16, 64, k, k) is not None
