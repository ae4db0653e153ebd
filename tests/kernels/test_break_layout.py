"""An adversarial pass over the layout constructors and methods: every bad argument is refused with
a ValueError or TypeError naming it, and what the docstrings promise holds at the edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels.layout
from kernels import (
    BlockLayout,
    causal_pairs,
    dense_layout,
    kept_pairs,
    local_stride_layout,
    random_layout,
    sparse_attention,
    token_mask,
)

from .test_break_api import _layout, _qkv


def _tril(blocks: int = 4) -> torch.Tensor:
    return torch.ones(1, blocks, blocks, dtype=torch.bool).tril()


# -- sequence lengths ------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_k,seq_q,error,match", [
    # A float or bool length used to pass check_seqlen (and density gave a number for 63.5 tokens).
    (63.5, None, TypeError, "seq_k must be an int, got float 63.5"),
    (64.0, None, TypeError, "seq_k must be an int, got float 64.0"),
    (True, None, TypeError, "seq_k must be an int, got bool True"),
    (64, 16.0, TypeError, "seq_q must be an int, got float 16.0"),
    # These failed inside a comparison ("'<' not supported between ...").
    ("64", None, TypeError, "seq_k must be an int, got str '64'"),
    (None, None, TypeError, "seq_k must be an int, got NoneType None"),
])
def test_check_seqlen_refuses_lengths_that_are_not_ints(seq_k, seq_q, error, match):
    lay = _layout()
    for call in (lambda: lay.check_seqlen(seq_k, seq_q), lambda: lay.density(seq_k, seq_q),
                 lambda: token_mask(lay, seq_k, seq_q), lambda: kept_pairs(lay, seq_k, seq_q)):
        with pytest.raises(error, match=match):
            call()


def test_check_seqlen_takes_numpy_ints():
    _layout().check_seqlen(np.int64(64), np.int32(10))


@pytest.mark.parametrize("seq_q,seq_k,match", [
    (10, 5, "seq_q must be <= seq_k"),  # gave 5: the offset went negative
    (-1, 5, "seq_q must be >= 0, got -1"),  # gave -6
    (2, 1.5, "seq_k must be an int"),
])
def test_causal_pairs_refuses_what_it_cannot_count(seq_q, seq_k, match):
    with pytest.raises((ValueError, TypeError), match=match):
        causal_pairs(seq_q, seq_k)


def test_causal_pairs_counts_valid_lengths():
    assert causal_pairs(0, 5) == 0
    assert causal_pairs(3, 3) == 6
    assert causal_pairs(2, 5) == 4 + 5


@pytest.mark.parametrize("seq_k,seq_q", [(64, None), (50, None), (64, 10), (37, 37), (33, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_density_matches_the_token_mask(seq_k, seq_q, causal):
    lay = random_layout(2, 4, 16, 0.5, seed=7, causal=causal)
    mask = token_mask(lay, seq_k, seq_q)
    total = causal_pairs(mask.shape[1], seq_k) if causal else mask[0].numel()
    assert lay.density(seq_k, seq_q) == pytest.approx(mask.sum().item() / mask.shape[0] / total)


# -- max_seqlen ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,causal",
                         [((1, 2, 4), True), ((1, 2, 4), False), ((1, 4, 2), False)])
def test_max_seqlen_is_a_length_check_seqlen_takes(shape, causal):
    # It was k_blocks * block_size, which check_seqlen refuses when q_blocks < k_blocks.
    pattern = torch.ones(shape, dtype=torch.bool)
    lay = BlockLayout.from_pattern(pattern, 16, causal=causal, warn_kv_cache=False)
    lay.check_seqlen(lay.max_seqlen)
    with pytest.raises(ValueError, match="too few"):
        lay.check_seqlen(lay.max_seqlen + 1)


# -- from_pattern and BlockLayout ------------------------------------------------------------------


@pytest.mark.parametrize("value", [2, -1])
def test_from_pattern_refuses_integers_other_than_zero_and_one(value):
    # "bool or integer 0/1": a 2 or -1 was silently read as a kept block.
    pattern = _tril().to(torch.int64)
    pattern[0, 1, 0] = value
    with pytest.raises(ValueError, match=rf"pattern must hold only 0 and 1, got {value}"):
        BlockLayout.from_pattern(pattern, 16)


def test_sparse_patterns_are_refused():
    sparse = _tril().to_sparse()
    # from_pattern failed in aten ("Could not run 'aten::ne.Scalar' ... SparseCPU"), and
    # BlockLayout took it as it was: the index forms cannot read it.
    with pytest.raises(TypeError, match="pattern must be a dense .*torch.sparse_coo"):
        BlockLayout.from_pattern(sparse, 16)
    with pytest.raises(TypeError, match="pattern must be a dense .*torch.sparse_coo"):
        BlockLayout(sparse, 16, True)
    assert BlockLayout.from_pattern(sparse.to_dense(), 16).heads == 1


@pytest.mark.parametrize("build,error,match", [
    (lambda: BlockLayout.from_pattern(_tril(), 16, warn_kv_cache="no"), TypeError,
     "warn_kv_cache must be a bool, got str 'no'"),
    (lambda: BlockLayout.from_pattern(_tril(), 16, description=3), TypeError,
     "description must be a str, got int 3"),
    (lambda: BlockLayout(_tril(), 16, True, None), TypeError,
     "description must be a str, got NoneType None"),
])
def test_blocklayout_refuses_bad_flags_and_descriptions(build, error, match):
    with pytest.raises(error, match=match):
        build()


# -- generators ------------------------------------------------------------------------------------


@pytest.mark.parametrize("density,error,match", [
    (True, TypeError, "density must be a real number, got bool True"),  # was density 1.0
    ("0.5", TypeError, "density must be a real number, got str '0.5'"),
    (None, TypeError, "density must be a real number, got NoneType None"),
    (float("nan"), ValueError, r"density must be in \(0, 1\], got nan"),
])
def test_random_layout_refuses_bad_densities(density, error, match):
    with pytest.raises(error, match=match):
        random_layout(2, 4, 16, density)


def test_random_layout_refuses_a_seed_out_of_range():
    # Failed in torch with "Overflow when unpacking long long".
    with pytest.raises(ValueError, match=r"seed must be in \[.*\], got 1180591620717411303424"):
        random_layout(2, 4, 16, 0.5, seed=2**70)
    random_layout(2, 4, 16, 0.5, seed=-1)


def test_numpy_ints_are_taken_everywhere_and_stored_as_ints():
    # local_stride_layout refused np.int64(2) as "not a positive int", and every constructor
    # refused a numpy block_size, while dense_layout and random_layout take numpy counts.
    n = np.int64
    for lay in (local_stride_layout(n(2), n(64), n(16), n(2), n(3)), dense_layout(n(4), n(16)),
                random_layout(n(2), n(4), n(16), 0.5),
                BlockLayout.from_pattern(_tril(), n(16)), BlockLayout(_tril(), n(16), True)):
        assert type(lay.block_size) is int and lay.block_size == 16
    assert torch.equal(local_stride_layout(n(2), n(64), n(16), n(2), n(3)).pattern,
                       _layout().pattern)


@pytest.mark.parametrize("build,error,match", [
    (lambda: local_stride_layout(2, 64.0, 16, 2, 3), ValueError,
     "max_seq_len must be a positive int, got 64.0"),
    (lambda: local_stride_layout(2, 64, 16, 0, 3), ValueError,
     "local_blocks must be a positive int, got 0"),
    (lambda: local_stride_layout(2, 64, np.float64(16), 2, 3), TypeError,
     "block_size must be an int, got float64"),
    # None is the default of num_kv_heads and head_sliding_step only: these two failed in
    # arithmetic ("unsupported operand" / "'<=' not supported").
    (lambda: _layout(head_sliding_offset=None), TypeError,
     "head_sliding_offset must be an int, got NoneType None"),
    (lambda: _layout(num_dense_heads=None), TypeError,
     "num_dense_heads must be an int, got NoneType None"),
])
def test_local_stride_layout_still_refuses(build, error, match):
    with pytest.raises(error, match=match):
        build()


# -- to(device) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [None, 1.5, [0]])
def test_to_refuses_what_is_not_a_device(device):
    # torch.device(None) failed with "device() received an invalid combination of arguments".
    with pytest.raises(TypeError, match="device must be a torch.device, a str or an int, got"):
        _layout().to(device)


@pytest.mark.parametrize("device,match", [("bogus", "device 'bogus' is not a device torch knows"),
                                          (-1, "device must be >= 0, got -1")])
def test_to_refuses_bad_device_names_and_indices(device, match):
    # "bogus" failed with torch's RuntimeError, -1 with one about accelerators.
    with pytest.raises(ValueError, match=match):
        _layout().to(device)


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu", 0)])
def test_to_the_cpu_is_the_layout_itself(device):
    # "cpu:0" compared unequal to the pattern's "cpu" and made (and kept) a second copy.
    lay = _layout()
    assert lay.to(device) is lay


# -- functions taking a layout ---------------------------------------------------------------------


@pytest.mark.parametrize("call", [lambda x: token_mask(x, 64), lambda x: kept_pairs(x, 64),
                                  kernels.layout.csr, kernels.layout.csc])
def test_functions_of_a_layout_refuse_what_is_not_one(call):
    # AttributeError: 'Tensor' object has no attribute 'check_seqlen'.
    with pytest.raises(TypeError, match="layout must be a BlockLayout, got Tensor"):
        call(_layout().pattern)


def test_zero_query_heads_are_refused():
    # q with 0 heads and k with 2 passed (0 is a multiple of 2) and returned an empty output.
    q, k, v = _qkv(heads=2)
    q = q[:, :, :0]
    with pytest.raises(ValueError, match=r"q has 0 heads"):
        sparse_attention(q, k, v, _layout())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", 0])
def test_to_a_missing_cuda_device_names_it(device):
    # Failed with torch's AssertionError "Torch not compiled with CUDA enabled" (or a
    # RuntimeError about accelerators for an int).
    with pytest.raises(ValueError, match="device .*cuda.* is not available"):
        _layout().to(device)


# -- index forms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["to_csr", "to_csc", "is_kv_cache_friendly"])
def test_index_forms_refuse_a_pattern_that_is_not_3d(name):
    # IndexError: "tuple index out of range" / "Dimension out of range".
    with pytest.raises(ValueError, match=r"pattern must be 3-D \(heads, q_blocks, k_blocks\), "
                                         r"got shape \(4, 4\)"):
        getattr(kernels.layout, name)(_tril()[0])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kw", [dict(head_sliding_step=2**62 + 1),
                                dict(head_sliding_offset=2**63 - 1),
                                dict(head_sliding_step=10**30, head_sliding_offset=-10**30)])
def test_local_stride_layout_stripes_of_huge_steps_and_offsets(kw, causal):
    # Was: h * step + offset overflowed int64 (a wrong pattern, silently) or raised an
    # OverflowError; the stripes only depend on them modulo vert_stride.
    reduced = {name: value % 3 for name, value in kw.items()}
    got = local_stride_layout(4, 128, 16, 1, 3, causal=causal, **kw).pattern
    assert torch.equal(got, local_stride_layout(4, 128, 16, 1, 3, causal=causal,
                                                **reduced).pattern)


@pytest.mark.parametrize("build,match", [
    # Was torch's allocation error (a 10**12-token pattern of 10**21 bools), after seconds.
    (lambda: local_stride_layout(2, 10**12, 64, 2, 3),
     r"max_seq_len must be at most 2965760 at block_size 64 \(46340 blocks: .* int32\), got "
     r"1000000000000 \(15625000000 blocks\)"),
    (lambda: local_stride_layout(1, 46340 * 16 + 1, 16, 2, 3, homo_head=True),
     r"max_seq_len must be at most 741440 at block_size 16 .* got 741441 \(46341 blocks\)"),
    # Was an OverflowError from the float quotient.
    (lambda: local_stride_layout(2, 10**400, 64, 2, 3), "max_seq_len must be at most 2965760"),
    (lambda: dense_layout(10**6, 16), r"num_blocks must be at most 46340 .* got 1000000"),
    (lambda: random_layout(1, 46341, 16, 0.5), r"num_blocks must be at most 46340 .* got 46341"),
])
def test_layout_generators_refuse_more_blocks_than_int32_indices_count(build, match):
    with pytest.raises(ValueError, match=match):
        build()
    # The bound: a head that keeps all of its blocks still counts them in an int32.
    bound = kernels.layout.MAX_NUM_BLOCKS
    assert bound**2 <= torch.iinfo(torch.int32).max < (bound + 1)**2
    assert kernels.MAX_NUM_BLOCKS == bound


def test_local_stride_layout_refuses_a_vert_stride_past_int64():
    # Was: OverflowError from torch ("int too big to convert").
    with pytest.raises(ValueError, match=r"vert_stride must be at most 2\*\*62 blocks"):
        local_stride_layout(2, 64, 16, 2, 10**30)
