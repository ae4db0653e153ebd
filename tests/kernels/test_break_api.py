"""An adversarial pass over the public API: every bad call is refused with a ValueError or
TypeError naming the argument before any kernel launches, and odd but valid calls (stride-0 and
overlapping views) still match the reference."""

from __future__ import annotations

import re

import pytest
import torch

import kernels.attention
import kernels.inference
from kernels import (
    BlockLayout,
    LaunchConfig,
    LocalStrideSparseAttention,
    SparseAttention,
    decode_workspace,
    dense_layout,
    dequantize_fp8,
    local_stride_layout,
    quantize_fp8,
    random_layout,
    reference_attention,
    sparse_attention,
    sparse_attention_decode,
    sparse_attention_padded,
    sparse_attention_varlen,
    varlen_sequences,
)

LAUNCHERS = {kernels.attention: ("sparse_attention_fwd",),
             kernels.inference: ("sparse_attention_fwd_varlen", "sparse_attention_decode_fwd",
                                 "decode_launch")}


@pytest.fixture
def no_launch(monkeypatch):
    """Any launch fails the test: a refusal must come first (and an AssertionError is not the
    ValueError/TypeError the tests expect)."""
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the call was refused")

    for module, names in LAUNCHERS.items():
        for name in names:
            monkeypatch.setattr(module, name, launched)


def _layout(heads: int = 2, seqlen: int = 64, block: int = 16, **kw) -> BlockLayout:
    return local_stride_layout(heads, seqlen, block, 2, 3, **kw)


def _qkv(batch: int = 1, seq: int = 64, heads: int = 2, dim: int = 16):
    return tuple(torch.randn(batch, seq, heads, dim) for _ in range(3))


# -- sparse_attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("change,error,match", [
    (dict(q=torch.randn(0, 64, 2, 16), k=torch.randn(0, 64, 2, 16), v=torch.randn(0, 64, 2, 16)),
     ValueError, "q has batch size 0"),
    (dict(sm_scale=True), TypeError, "sm_scale must be a real number or None, got bool"),
    (dict(sm_scale="0.5"), TypeError, "sm_scale must be a real number or None, got str"),
    (dict(sm_scale=torch.tensor([0.5, 0.2])), TypeError, "sm_scale must be a real number"),
    (dict(sm_scale=1e300), ValueError, "float32's range"),
    (dict(seq_dim=1.0), ValueError, "seq_dim must be 1 .* got 1.0"),
    (dict(seq_dim=True), ValueError, "seq_dim must be 1 .* got True"),
    (dict(config={"block_m": 16, "block_n": 16}), TypeError,
     "config must be a kernels.LaunchConfig or None, got dict"),
    (dict(bwd_config=(16, 16, 4, 1)), TypeError, "bwd_config must be a kernels.LaunchConfig"),
    (dict(dq_config="m16n16"), TypeError, "dq_config must be a kernels.LaunchConfig"),
    (dict(config=LaunchConfig(16.0, 16, 4, 1)), TypeError,
     "config.block_m must be an int, got 16.0"),
    (dict(config=LaunchConfig(16, 16, True, 1)), TypeError, "config.num_warps must be an int"),
    (dict(config=LaunchConfig(16, 16, 4, 1.5)), TypeError, "config.num_stages must be an int"),
    # Was launched: no kernel holds 1000 pipeline stages in shared memory.
    (dict(config=LaunchConfig(16, 16, 4, 1000)), ValueError,
     r"invalid launch config m16n16w4s1000: num_stages=1000 must be 1 to 8 \(the config "),
    (dict(bwd_config=LaunchConfig(16, 16, 4, 9)), ValueError,
     r"num_stages=9 must be 1 to 8 \(the bwd_config "),
])
def test_sparse_attention_refuses(change, error, match, no_launch):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, layout=_layout())
    args.update(change)
    with pytest.raises(error, match=match):
        sparse_attention(**args)


def test_a_tensor_scale_still_runs():
    q, k, v = _qkv()
    layout = _layout()
    out = sparse_attention(q, k, v, layout, sm_scale=torch.tensor(0.3))
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, layout, sm_scale=0.3),
                               atol=2e-5, rtol=0)


@pytest.mark.parametrize("build,error,match", [
    (lambda: SparseAttention(16, torch.ones(1, 4, 4, dtype=torch.bool).tril(), seq_dim=True),
     ValueError, "seq_dim must be 1"),
    (lambda: SparseAttention(16, torch.ones(1, 4, 4, dtype=torch.bool).tril(), causal=None),
     TypeError, "causal must be a bool, got NoneType"),
    (lambda: LocalStrideSparseAttention(2, 64, 16, 2, 3, seq_dim=2.0), ValueError,
     "seq_dim must be 1"),
    (lambda: LocalStrideSparseAttention(2, 64, 16, 2, 3, causal="no"), TypeError,
     "causal must be a bool, got str"),
])
def test_modules_refuse_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


# -- layouts ---------------------------------------------------------------------------------------


def test_an_integer_pattern_given_to_blocklayout_is_refused(no_launch):
    # It used to run, and gave wrong results: the index forms negate the pattern with ``~``.
    pattern = _layout().pattern.to(torch.int32)
    with pytest.raises(TypeError, match="BlockLayout needs a bool pattern .* got torch.int32"):
        BlockLayout(pattern, 16, True)
    assert BlockLayout.from_pattern(pattern, 16).pattern.dtype == torch.bool  # the way in


@pytest.mark.parametrize("build,error,match", [
    (lambda p: BlockLayout(p.float(), 16, True), TypeError, "needs a bool pattern"),
    (lambda p: BlockLayout(p[0], 16, True), TypeError, r"needs a bool pattern .*\(4, 4\)"),
    (lambda p: BlockLayout(p[:, :0], 16, True), ValueError, "pattern must not be empty"),
    (lambda p: BlockLayout(p, 12, True), ValueError, "block_size must be a power of two >= 16"),
    (lambda p: BlockLayout(p, 16.0, True), TypeError, "block_size must be an int, got float"),
    (lambda p: BlockLayout(p, 16, "yes"), TypeError, "causal must be a bool, got str"),
    (lambda p: BlockLayout(p.to("meta"), 16, True), ValueError, "pattern is on meta"),
    (lambda p: BlockLayout.from_pattern(p.to("meta"), 16), ValueError, "pattern is on meta"),
    (lambda p: BlockLayout.from_pattern(p, 16, causal=1), TypeError, "causal must be a bool"),
    (lambda p: _layout().to("meta"), ValueError, "pattern is on meta"),
])
def test_blocklayout_refuses_what_the_kernels_cannot_read(build, error, match):
    with pytest.raises(error, match=match):
        build(_layout().pattern)


@pytest.mark.parametrize("build,error,match", [
    (lambda: dense_layout(0, 16), ValueError, "num_blocks must be >= 1, got 0"),
    (lambda: dense_layout(-1, 16), ValueError, "num_blocks must be >= 1, got -1"),
    (lambda: dense_layout(2.5, 16), TypeError, "num_blocks must be an int, got float"),
    (lambda: random_layout(2, 4, 16, 0.5, seed=1.5), TypeError, "seed must be an int"),
    (lambda: random_layout(2.0, 4, 16, 0.5), TypeError, "heads must be an int"),
    (lambda: _layout(num_kv_heads=1.5), TypeError, "num_kv_heads must be an int, got float"),
    (lambda: _layout(head_sliding_step=1.5), TypeError, "head_sliding_step must be an int"),
    (lambda: _layout(num_dense_heads=1.5), TypeError, "num_dense_heads must be an int"),
    (lambda: _layout(homo_head=None), TypeError, "homo_head must be a bool"),
    (lambda: local_stride_layout(True, 64, 16, 2, 3), ValueError,
     "num_heads must be a positive int, got True"),
])
def test_layout_generators_refuse_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


# -- varlen and padded -----------------------------------------------------------------------------


def _packed(total: int = 64, heads: int = 2, dim: int = 16):
    return tuple(torch.randn(total, heads, dim) for _ in range(3))


@pytest.mark.parametrize("cu,error,match", [
    (torch.tensor([0, 1, 64]).bool(), TypeError,
     "cu_seqlens_q must be a 1-D integer tensor, got torch.bool"),
    (torch.tensor([0, 40, 20, 64]), ValueError,
     "cu_seqlens_q must be non-decreasing .* 40 then 20"),
    (torch.tensor([0, 20, 64]).to("meta"), ValueError, "cu_seqlens_q is on meta"),
])
def test_varlen_refuses_bad_cu_seqlens(cu, error, match, no_launch):
    q, k, v = _packed()
    with pytest.raises(error, match=match):
        sparse_attention_varlen(q, k, v, cu, cu, _layout(seqlen=128))


def test_varlen_refuses_a_table_of_another_sequence_count(no_launch):
    q, k, v = _packed()
    cu = torch.tensor([0, 20, 64])
    other = varlen_sequences(torch.tensor([0, 10, 30, 64]), torch.tensor([0, 10, 30, 64]))
    with pytest.raises(ValueError, match=r"sequences holds 3 sequences, but cu_seqlens_q has "
                                         r"shape \(3,\), not \(4,\)"):
        sparse_attention_varlen(q, k, v, cu, cu, _layout(seqlen=128), sequences=other)


def test_varlen_refuses_a_table_of_other_lengths_given_host_cu_seqlens(no_launch):
    """Same count and totals, other lengths: the kernel would read the table's rows and give
    wrong output. Host cu_seqlens cost nothing to compare."""
    q, k, v = _packed()
    cu = torch.tensor([0, 20, 64])
    other = varlen_sequences(torch.tensor([0, 10, 64]), torch.tensor([0, 10, 64]))
    with pytest.raises(ValueError, match=r"sequences was made from other lengths than "
                                         r"cu_seqlens_q: sequence 0 is 10 long in the table and "
                                         r"20 in cu_seqlens_q"):
        sparse_attention_varlen(q, k, v, cu, cu, _layout(seqlen=128), sequences=other)


def test_varlen_takes_a_table_of_the_same_lengths():
    q, k, v = _packed()
    cu = torch.tensor([0, 20, 64])
    layout = _layout(seqlen=128)
    table = varlen_sequences(cu, cu)
    with_table = sparse_attention_varlen(q, k, v, cu, cu, layout, sequences=table)
    torch.testing.assert_close(with_table, sparse_attention_varlen(q, k, v, cu, cu, layout))


def test_varlen_and_padded_refuse_bad_configs_and_empty_batches(no_launch):
    q, k, v = _packed()
    cu = torch.tensor([0, 20, 64])
    with pytest.raises(TypeError, match="config must be a kernels.LaunchConfig or None, got dict"):
        sparse_attention_varlen(q, k, v, cu, cu, _layout(seqlen=128), config={"block_m": 16})
    q, k, v = _qkv(batch=0)
    with pytest.raises(ValueError, match="q has batch size 0"):
        sparse_attention_padded(q, k, v, torch.tensor([], dtype=torch.int64), _layout())


# -- decode ----------------------------------------------------------------------------------------


def _decode_args(batch: int = 2, heads: int = 4, kv_heads: int = 2, dim: int = 16,
                 max_len: int = 128):
    layout = local_stride_layout(heads, max_len, 16, 2, 3)
    q = torch.randn(batch, heads, dim)
    k, v = (torch.randn(batch, max_len, kv_heads, dim) for _ in range(2))
    return q, k, v, torch.tensor([100, 37][:batch], dtype=torch.int32), layout


@pytest.mark.parametrize("change,error,match", [
    (dict(cache_seqlens=torch.tensor([True, True])), TypeError,
     "cache_seqlens must be a 1-D integer tensor, got torch.bool"),
    (dict(cache_seqlens=torch.tensor([5, 3], dtype=torch.int32).to("meta")), ValueError,
     "cache_seqlens is on meta"),
    (dict(num_splits=1.5), TypeError, "num_splits must be an int or None, got float"),
    (dict(num_splits=True), TypeError, "num_splits must be an int or None, got bool"),
    (dict(config={"block_n": 16}), TypeError, "config must be a kernels.LaunchConfig"),
])
def test_decode_refuses(change, error, match, no_launch):
    q, k, v, lens, layout = _decode_args()
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens, layout=layout)
    args.update(change)
    with pytest.raises(error, match=match):
        sparse_attention_decode(**args)


def test_decode_refuses_an_empty_batch(no_launch):
    q, k, v, lens, layout = _decode_args()
    with pytest.raises(ValueError, match="q has batch size 0"):
        sparse_attention_decode(q[:0], k[:0], v[:0], lens[:0], layout)


@pytest.mark.parametrize("change,error,match", [
    (dict(q=torch.randn(2, 4, 16).int()), TypeError, "q has dtype torch.int32"),
    (dict(q=torch.randn(2, 4, 16, device="meta")), ValueError, "q is on meta"),
    (dict(q=torch.randn(0, 4, 16)), ValueError, "q has batch size 0"),
    (dict(kv_heads=1.5), TypeError, "kv_heads must be an int, got float"),
    (dict(num_splits=2.5), TypeError, "num_splits must be an int or None, got float"),
    (dict(layout=local_stride_layout(4, 128, 16, 2, 3, causal=False)), ValueError,
     "decoding needs a causal layout"),
])
def test_decode_workspace_refuses(change, error, match):
    args = dict(q=torch.randn(2, 4, 16), kv_heads=2, layout=local_stride_layout(4, 128, 16, 2, 3))
    args.update(change)
    with pytest.raises(error, match=match):
        decode_workspace(**args)


# -- quantisation ----------------------------------------------------------------------------------


def test_quantize_and_dequantize_refuse_bad_arguments():
    q, k, v = _qkv(dim=32)
    with pytest.raises(ValueError, match=r"q is empty, shape \(1, 0, 2, 32\)"):
        quantize_fp8(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="seq_dim must be 1 .* got True"):
        quantize_fp8(q, k, v, seq_dim=True)
    x = quantize_fp8(q, k, v)
    with pytest.raises(TypeError, match="x must be the Fp8Inputs quantize_fp8 returns, got tuple"):
        dequantize_fp8(tuple(x))
    with pytest.raises(ValueError, match=r"x.q has 64 heads on axis 1 \(seq_dim=2\) but 2 "
                                         "descales"):
        dequantize_fp8(x, seq_dim=2)


# -- odd but valid views ---------------------------------------------------------------------------


def _odd_views(seq: int, heads: int, dim: int):
    """A stride-0 key (one key repeated along the sequence and the heads) and an overlapping
    value (rows sharing memory)."""
    k = torch.randn(1, 1, 1, dim).expand(1, seq, heads, dim)
    v = torch.randn(seq + heads * 3 + dim * 5).as_strided((1, seq, heads, dim), (0, 1, 3, 5))
    return k, v


def test_stride_zero_and_overlapping_views_match_the_reference():
    layout = _layout(4, num_kv_heads=2)
    q = torch.randn(1, 64, 4, 16)
    k, v = _odd_views(64, 2, 16)
    out = sparse_attention(q, k, v, layout)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, layout), atol=2e-5,
                               rtol=0)


def test_stride_zero_views_match_the_reference_in_decode():
    q, _, _, lens, layout = _decode_args()
    k, v = _odd_views(128, 2, 16)
    k, v = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
    out = sparse_attention_decode(q, k, v, lens, layout, num_splits=2)
    for b, n in enumerate(lens.tolist()):
        ref = reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n], layout)
        torch.testing.assert_close(out[b].double(), ref[0, 0], atol=2e-5, rtol=0)


# -- the fp8 forward and the partition API take the same argument checks --

@pytest.fixture
def no_fp8_or_partition_launch(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the call was refused")

    import kernels.fp8
    import kernels.partitions

    monkeypatch.setattr(kernels.fp8, "sparse_attention_fp8_fwd", launched)
    monkeypatch.setattr(kernels.partitions, "sparse_attention_fwd", launched)


def _fp8_inputs():
    e4m3 = kernels.FP8_DTYPE
    q, k = (torch.randn(1, 64, 2, 32).to(e4m3) for _ in range(2))
    v_t = torch.randn(1, 2, 32, 64).to(e4m3)
    return q, k, v_t, _layout()


@pytest.mark.usefixtures("no_fp8_or_partition_launch")
@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"config": {"block_m": 16}}, TypeError, "config must be a kernels.LaunchConfig or None"),
    ({"seq_dim": 1.0}, ValueError, "seq_dim must be 1"),
    ({"q_descale": torch.tensor([0.0])}, ValueError, "q_descale must be finite and positive"),
    ({"k_descale": torch.tensor([float("nan"), 1.0])}, ValueError,
     "k_descale must be finite and positive, got nan"),
    ({"v_descale": torch.tensor([-1.0])}, ValueError, "v_descale must be finite and positive"),
])
def test_fp8_refuses_bad_arguments_before_launch(kwargs, error, words) -> None:
    q, k, v_t, layout = _fp8_inputs()
    with pytest.raises(error, match=re.escape(words)):
        kernels.sparse_attention_fp8(q, k, v_t, layout, **kwargs)


@pytest.mark.usefixtures("no_fp8_or_partition_launch")
def test_fp8_refuses_batch_zero() -> None:
    q, k, v_t, layout = _fp8_inputs()
    with pytest.raises(ValueError, match="q has batch size 0"):
        kernels.sparse_attention_fp8(q[:0], k[:0], v_t[:0], layout)


@pytest.mark.usefixtures("no_fp8_or_partition_launch")
@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"config": {"block_m": 16}}, TypeError, "config must be a kernels.LaunchConfig or None"),
    ({"seq_dim": 1.0}, ValueError, "seq_dim must be 1"),
])
def test_partition_refuses_bad_arguments_before_launch(kwargs, error, words) -> None:
    from kernels.partitions import sparse_attention_partition

    q = torch.randn(1, 64, 2, 16)
    with pytest.raises(error, match=re.escape(words)):
        sparse_attention_partition(q, q, q, _layout(), 0, 0, **kwargs)


# -- flags, storage, numpy ints, devices and lookups ------------------------------------------


@pytest.mark.usefixtures("no_launch", "no_fp8_or_partition_launch")
@pytest.mark.parametrize("flag", [1, "yes", None])
def test_return_lse_must_be_a_bool(flag) -> None:
    # Was: any truthy value returned (out, lse), and None or 0 just out, with no word said.
    q, k, v = _qkv()
    module = SparseAttention(16, torch.ones(4, 4, dtype=torch.bool).tril())
    q8, k8, v_t, layout = _fp8_inputs()
    for call in (lambda: sparse_attention(q, k, v, _layout(), return_lse=flag),
                 lambda: module(q, k, v, return_lse=flag),
                 lambda: kernels.sparse_attention_fp8(q8, k8, v_t, layout, return_lse=flag)):
        with pytest.raises(TypeError, match="return_lse must be a bool"):
            call()


@pytest.mark.usefixtures("no_launch")
def test_sparse_tensors_are_refused_naming_the_argument() -> None:
    # Was: NotImplementedError from inside the interpreter (sparse_attention), torch's amax
    # (quantize_fp8) or addcmul_ (combine_attn_partitions).
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k must be a dense .strided. tensor"):
        sparse_attention(q, k.to_sparse(), v, _layout())
    with pytest.raises(TypeError, match="q must be a dense .strided. tensor"):
        quantize_fp8(q.to_sparse(), k, v)
    out, lse = torch.randn(1, 64, 2, 16), torch.randn(1, 2, 64)
    with pytest.raises(TypeError, match=re.escape("outs[0] must be a dense (strided) tensor")):
        kernels.combine_attn_partitions([out.to_sparse()], [lse])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_combine_refuses_nan_and_infinite_lses(bad: float) -> None:
    # Was: every merged row came out NaN.
    out, lse = torch.randn(1, 64, 2, 16), torch.randn(1, 2, 64)
    lse_bad = lse.clone()
    lse_bad[0, 1, 3] = bad
    with pytest.raises(ValueError, match=re.escape(f"lses[1] holds {bad}")):
        kernels.combine_attn_partitions([out, out], [lse, lse_bad])
    lse_bad[0, 1, 3] = float("-inf")  # a row that saw no key of the segment
    kernels.combine_attn_partitions([out, out], [lse, lse_bad])


def test_numpy_ints_are_taken_for_positions_and_the_cache_length() -> None:
    # Was: "q_start must be an int, got int64", "max_cache_len must be a Python int".
    np = pytest.importorskip("numpy")
    from kernels.partitions import sparse_attention_partition

    q, k, v = _qkv()
    got = sparse_attention_partition(q, k[:, 16:], v[:, 16:], _layout(), np.int64(0),
                                     np.int64(16))
    want = sparse_attention_partition(q, k[:, 16:], v[:, 16:], _layout(), 0, 16)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    qd, kc, vc = torch.randn(2, 2, 16), torch.randn(2, 64, 2, 16), torch.randn(2, 64, 2, 16)
    lens = torch.tensor([20, 48], dtype=torch.int32)
    torch.testing.assert_close(
        sparse_attention_decode(qd, kc, vc, lens, _layout(), max_cache_len=np.int64(48)),
        sparse_attention_decode(qd, kc, vc, lens, _layout(), max_cache_len=48), rtol=0, atol=0)


@pytest.mark.parametrize("device,error,match", [
    pytest.param("cuda:0", ValueError, "device cuda:0 is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
    ("nonsense", ValueError, "device 'nonsense' is not a device torch knows"),
    (3.5, TypeError, "device must be a torch.device, a str, an int or None, got float"),
    (-1, ValueError, "device must be a CUDA device index >= 0, got -1"),
])
def test_varlen_sequences_refuses_what_is_no_device_here(device, error, match):
    # Was: torch's own errors (a RuntimeError, a TypeError naming no argument, an
    # AssertionError "Torch not compiled with CUDA enabled").
    cu = torch.tensor([0, 16, 48])
    with pytest.raises(error, match=re.escape(match)):
        varlen_sequences(cu, cu, device=device)


@pytest.mark.parametrize("call,error,match", [
    (lambda q: kernels.block_density(_layout(), 0), ValueError, "seq_k must be >= 1, got 0"),
    (lambda q: kernels.block_density(None, 64), TypeError, "layout must be a BlockLayout"),
    (lambda q: kernels.block_density(_layout(), 64.0), TypeError, "seq_k must be an int"),
    (lambda q: kernels.resolve_config("fwd", q, _layout(), 0), ValueError, "seq_k must be >= 1"),
    (lambda q: kernels.resolve_config("fwd", [q], _layout(), 64), TypeError,
     "q must be a torch.Tensor"),
    (lambda q: kernels.resolve_config("fwd", q, None, 64), TypeError,
     "layout must be a BlockLayout, got NoneType"),
    (lambda q: kernels.cache_key("nope", q.device, q.dtype, 16, 16, 64, 0.5), ValueError,
     "unknown kernel 'nope'"),
    (lambda q: kernels.choose_impl("nope", "triton", q.device, q.dtype), ValueError,
     "unknown kernel 'nope'"),
])
def test_the_lookups_refuse_bad_arguments(call, error, match) -> None:
    # Was: ZeroDivisionError (no keys), AttributeError, KeyError, a weakref TypeError.
    with pytest.raises(error, match=re.escape(match)):
        call(torch.randn(1, 2, 64, 16))
