"""Varlen, left-padded and chunked prefill, and KV-cache decoding, against the reference
run on each sequence alone (each sequence's pattern starts at its own first token)."""

import pytest
import torch

from kernels import (LaunchConfig, reference_attention, sparse_attention_decode,
                     sparse_attention_padded, sparse_attention_varlen)
from tests.kernels.cases import make_layout
from tests.tolerances import assert_verbose_close, rel_tol


def _cu(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device,
                        dtype=torch.int32)


VARLEN = [
    # family, causal, q_lens, k_lens, heads, kv_heads, dim, block, dtype, config
    ("hetero", True, [200, 77, 256, 33], [200, 77, 256, 33], 4, 2, 64, 32, torch.float32, None),
    ("hetero", True, [64, 1, 100], [200, 90, 256], 4, 1, 64, 32, torch.float16, None),  # chunks
    ("random", False, [150, 40, 256], [150, 40, 256], 2, 2, 80, 32, torch.float32, None),
    ("dense_heads", True, [250, 17], [250, 17], 4, 2, 32, 16, torch.float32,
     LaunchConfig(64, 16, 4, 1)),  # tiles spanning several sparse blocks
]


@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"{c[0]}-{'causal' if c[1] else 'bidir'}-"
                         f"q{sum(c[2])}k{sum(c[3])}-{str(c[8])[6:]}")
def test_varlen_matches_per_sequence_reference(case, device, poison_outputs):
    family, causal, q_lens, k_lens, h, hkv, d, bs, dtype, config = case
    layout = make_layout(family, h, hkv, max(k_lens), bs, causal)
    q = torch.randn(sum(q_lens), h, d, device=device, dtype=dtype)
    k = torch.randn(sum(k_lens), hkv, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    cq, ck = _cu(q_lens, device), _cu(k_lens, device)
    out = sparse_attention_varlen(q, k, v, cq, ck, layout, config=config)
    assert out.shape == q.shape and out.dtype == dtype
    for i in range(len(q_lens)):
        qs, ks = slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1]))
        ref = reference_attention(q[qs][None], k[ks][None], v[ks][None], layout)[0]
        assert_verbose_close(out[qs], ref, rel_tol(dtype, device), f"sequence {i}")


@pytest.mark.parametrize("causal", [True, False])
def test_left_padded_batch(causal, device, poison_outputs):
    lens = [200, 77, 256, 33]
    layout = make_layout("hetero", 4, 2, 256, 32, causal)
    q = torch.randn(4, 256, 4, 64, device=device)
    k = torch.randn(4, 256, 2, 64, device=device)
    v = torch.randn_like(k)
    out = sparse_attention_padded(q, k, v, torch.tensor(lens), layout)
    for b, n in enumerate(lens):
        real = slice(256 - n, 256)
        ref = reference_attention(q[b:b + 1, real], k[b:b + 1, real], v[b:b + 1, real], layout)[0]
        assert_verbose_close(out[b, real], ref, rel_tol(torch.float32, device), f"sequence {b}")
        assert torch.count_nonzero(out[b, :256 - n]) == 0, "padded rows must be zero"


@pytest.mark.parametrize("family,dtype", [("hetero", torch.float32), ("dense_heads", torch.float16),
                                          ("homo", torch.bfloat16)])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_decode_each_sequence_its_own_length(family, dtype, splits, device, poison_outputs):
    lens = [200, 77, 320, 1, 64]
    layout = make_layout(family, 8, 2, 320, 32)
    q = torch.randn(5, 8, 64, device=device, dtype=dtype)
    k = torch.randn(5, 320, 2, 64, device=device, dtype=dtype)
    v = torch.randn_like(k)
    out = sparse_attention_decode(q, k, v, torch.tensor(lens), layout, num_splits=splits)
    assert out.shape == q.shape
    for b, n in enumerate(lens):
        ref = reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n], layout)[0, 0]
        assert_verbose_close(out[b], ref, rel_tol(dtype, device), f"sequence {b}")


def test_decode_ignores_cache_beyond_each_length(device):
    layout = make_layout("hetero", 4, 4, 128, 32)
    q = torch.randn(2, 4, 32, device=device)
    k = torch.randn(2, 128, 4, 32, device=device)
    v = torch.randn_like(k)
    lens = torch.tensor([70, 128])
    out = sparse_attention_decode(q, k, v, lens, layout)
    k[0, 70:] += 100.0
    v[0, 70:] -= 100.0
    torch.testing.assert_close(sparse_attention_decode(q, k, v, lens, layout), out, rtol=0, atol=0)


def test_zero_length_and_bad_lengths_are_rejected(device):
    layout = make_layout("hetero", 2, 2, 128, 32)
    q = torch.randn(100, 2, 32, device=device)
    with pytest.raises(ValueError, match="zero-length sequences are not allowed"):
        sparse_attention_varlen(q, q, q, _cu([100, 0], device), _cu([100, 0], device), layout)
    with pytest.raises(ValueError, match="q_len <= k_len"):
        sparse_attention_varlen(q, q[:60], q[:60], _cu([100], device), _cu([60], device), layout)
    with pytest.raises(ValueError, match="end at the packed lengths"):
        sparse_attention_varlen(q, q, q, _cu([50], device), _cu([50], device), layout)
    padded = torch.randn(2, 64, 2, 32, device=device)
    with pytest.raises(ValueError, match="zero-length"):
        sparse_attention_padded(padded, padded, padded, torch.tensor([64, 0]), layout)
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[1, 64\]"):
        sparse_attention_decode(padded[:, 0], padded, padded, torch.tensor([0, 3]), layout)
    with pytest.raises(ValueError, match="num_splits"):
        sparse_attention_decode(padded[:, 0], padded, padded, torch.tensor([5, 3]), layout,
                                num_splits=0)


def test_inference_forms_refuse_gradients_and_bidirectional_decode(device):
    layout = make_layout("hetero", 2, 2, 64, 32)
    q = torch.randn(64, 2, 32, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="inference-only"):
        sparse_attention_varlen(q, q, q, _cu([64], device), _cu([64], device), layout)
    bidir = make_layout("hetero", 2, 2, 64, 32, causal=False)
    cache = torch.randn(1, 64, 2, 32, device=device)
    with pytest.raises(ValueError, match="causal layout"):
        sparse_attention_decode(cache[:, 0], cache, cache, torch.tensor([10]), bidir)


def test_varlen_defaults_to_triton_where_the_forward_defaults_to_gluon(monkeypatch) -> None:
    """The varlen kernel has a Triton implementation only: where the forward's default is the
    Gluon kernel (Hopper), varlen's is the forward's Triton default; resolve_varlen_config looks
    up the varlen kernel's own configs (a Gluon one found there is skipped: test_select.py)."""
    from kernels import configs, inference, local_stride_layout, select

    monkeypatch.setattr(configs, "gluon_default_applies", lambda *args: True)
    cuda = torch.device("cuda")
    assert configs.default_config("fwd", cuda, 64, 128, torch.bfloat16) == configs.GLUON_DEFAULT
    varlen = configs.default_config("varlen", cuda, 64, 128, torch.bfloat16)
    assert varlen == configs.default_config("fwd", cuda, 64, 128, torch.bfloat16,
                                            allow_gluon=False)
    assert varlen.impl == "triton"
    asked = []
    tuned = LaunchConfig(64, 32, 4, 2)

    def resolve(kernel, *args, **kwargs):
        asked.append(kernel)
        return tuned, "cache"

    monkeypatch.setattr(select, "resolve_config", resolve)
    layout = local_stride_layout(2, 256, 64, 2, 2)
    assert inference.resolve_varlen_config(torch.empty(1, 1, 1, 64), layout, 256) == (tuned,
                                                                                       "cache")
    assert asked == ["varlen"]
