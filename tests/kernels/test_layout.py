"""Block layouts: generator semantics, validation errors, index forms."""

import warnings

import pytest
import torch

from kernels import BlockLayout, KVCacheUnfriendlyWarning, csc, csr, local_stride_layout, token_mask
from kernels.layout import causal_pairs, dense_layout, is_kv_cache_friendly, random_layout


def test_local_stride_matches_phi3_rule():
    # phi-3-small: query head h keeps kv block j when (j + h + 1) % 8 == 0, plus 16 local blocks.
    lay = local_stride_layout(32, 8192, 64, 16, 8, head_sliding_offset=1)
    p = lay.pattern
    assert p.shape == (32, 128, 128)
    for h in (0, 5, 31):
        for i in (0, 20, 127):
            for j in range(128):
                expected = j <= i and (i - j < 16 or (j + h + 1) % 8 == 0)
                assert bool(p[h, i, j]) == expected, (h, i, j)


def test_local_stride_density_matches_reference_figures():
    # REFERENCE.md: share of causal token pairs kept 0.324 / 0.228 at 8k / 16k.
    for seqlen, share in ((8192, 0.324), (16384, 0.228)):
        lay = local_stride_layout(32, seqlen, 64, 16, 8, head_sliding_offset=1)
        nb = seqlen // 64
        kept_pairs = 0
        # Diagonal blocks keep 64*65/2 causal pairs, off-diagonal ones 64*64.
        off_diag = lay.pattern.sum().item() - 32 * nb
        kept_pairs = off_diag * 64 * 64 + 32 * nb * 64 * 65 // 2
        density = kept_pairs / (32 * causal_pairs(seqlen, seqlen))
        assert abs(density - share) < 0.001, (seqlen, density)


def test_homo_and_per_group_and_dense_heads():
    homo = local_stride_layout(8, 512, 32, 2, 4, homo_head=True)
    assert homo.heads == 1
    grouped = local_stride_layout(8, 512, 32, 2, 4, num_kv_heads=2, num_dense_heads=1)
    assert grouped.heads == 2
    nb = 16
    assert bool(grouped.pattern[1].eq(torch.ones(nb, nb, dtype=torch.bool).tril()).all())
    assert not bool(grouped.pattern[0].eq(torch.ones(nb, nb, dtype=torch.bool).tril()).all())
    # default step: max(1, vert_stride // num_heads) = 1 -> heads shift their vertical blocks.
    het = local_stride_layout(2, 512, 32, 1, 4)
    assert not torch.equal(het.pattern[0], het.pattern[1])


def test_bidirectional_is_symmetric_in_window_and_relative():
    lay = local_stride_layout(1, 512, 32, 2, 4, causal=False)
    p = lay.pattern[0]
    for i in range(16):
        for j in range(16):
            assert bool(p[i, j]) == (abs(i - j) < 2 or (i - j) % 4 == 0), (i, j)


@pytest.mark.parametrize("bs", [8, 24, 0, 48])
def test_block_size_must_be_power_of_two_at_least_16(bs):
    with pytest.raises(ValueError, match="block_size"):
        local_stride_layout(2, 256, bs, 2, 2)
    with pytest.raises(ValueError, match="block_size"):
        BlockLayout.from_pattern(torch.ones(1, 4, 4, dtype=torch.bool).tril(), bs)


def test_pattern_missing_diagonal_is_rejected():
    p = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    p[1, 2, 2] = False
    with pytest.raises(ValueError, match=r"diagonal.*head 1.*\(2, 2\)"):
        BlockLayout.from_pattern(p, 16)


def test_pattern_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="shape"):
        BlockLayout.from_pattern(torch.ones(1, 1, 4, 4, dtype=torch.bool), 16)
    with pytest.raises(TypeError, match="bool or integer"):
        BlockLayout.from_pattern(torch.ones(1, 4, 4), 16)
    with pytest.raises(ValueError, match="keeps no kv block"):
        BlockLayout.from_pattern(torch.zeros(1, 4, 4, dtype=torch.bool), 16, causal=False)


def test_pattern_too_short_for_sequence():
    lay = local_stride_layout(2, 256, 32, 2, 2)
    lay.check_seqlen(256)
    with pytest.raises(ValueError, match="too few for key length 300"):
        lay.check_seqlen(300)
    with pytest.raises(ValueError, match="query length must be <= key length"):
        lay.check_seqlen(100, 200)


def test_kv_cache_unfriendly_pattern_warns():
    p = torch.ones(1, 4, 4, dtype=torch.bool).tril()
    p[0, 2, 0] = False  # row 3 keeps block 0 again after row 2 dropped it
    assert not is_kv_cache_friendly(p)
    with pytest.warns(KVCacheUnfriendlyWarning):
        BlockLayout.from_pattern(p, 16)
    friendly = local_stride_layout(2, 512, 32, 2, 4).pattern
    assert is_kv_cache_friendly(friendly)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BlockLayout.from_pattern(friendly, 32)


def test_above_diagonal_blocks_dropped_for_causal():
    lay = BlockLayout.from_pattern(torch.ones(1, 4, 4, dtype=torch.bool), 16, warn_kv_cache=False)
    assert torch.equal(lay.pattern[0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_csr_and_csc_round_trip():
    lay = random_layout(3, 9, 16, 0.4, seed=3)
    row_ptr, col_idx = csr(lay)
    assert row_ptr.dtype == torch.int32 and col_idx.dtype == torch.int32
    rebuilt = torch.zeros_like(lay.pattern)
    for h in range(3):
        for i in range(9):
            cols = col_idx[h, row_ptr[h, i]:row_ptr[h, i + 1]].long()
            assert torch.all(cols[1:] > cols[:-1])
            rebuilt[h, i, cols] = True
    assert torch.equal(rebuilt, lay.pattern)
    col_ptr, row_idx = csc(lay)
    rebuilt_t = torch.zeros_like(lay.pattern)
    for h in range(3):
        for j in range(9):
            rebuilt_t[h, row_idx[h, col_ptr[h, j]:col_ptr[h, j + 1]].long(), j] = True
    assert torch.equal(rebuilt_t, lay.pattern)
    assert csr(lay) is csr(lay)  # built once


def test_token_mask_with_shorter_queries():
    lay = dense_layout(4, 16)
    m = token_mask(lay, 64, 10)
    assert m.shape == (1, 10, 64)
    # query i sits at absolute position 54 + i and sees keys 0..54+i.
    assert m[0].sum(dim=1).tolist() == [55 + i for i in range(10)]
    assert lay.density(64, 10) == pytest.approx(1.0)
