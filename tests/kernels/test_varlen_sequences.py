"""Varlen prefill with its sequence table built once (`varlen_sequences`): the same answer as a
call that builds its own and as the reference, no cu_seqlens read back and nothing allocated but
the output; tables that do not fit the call are refused by name."""

import pytest
import torch

import kernels.buffers
import kernels.inference
from kernels import (
    LaunchConfig,
    VarlenSequences,
    reference_attention,
    sparse_attention_varlen,
    varlen_sequences,
)
from tests.kernels.cases import make_layout
from tests.kernels.test_inference import _cu
from tests.tolerances import assert_verbose_close, rel_tol

BATCHES = [
    # family, causal, q_lens, k_lens, heads, kv_heads, dtype, config
    ("hetero", True, [130, 1, 64, 33], [130, 1, 64, 33], 4, 2, torch.float32, None),
    ("hetero", True, [40, 1, 90], [160, 70, 90], 4, 1, torch.float16, None),  # chunks
    ("random", False, [150, 17], [150, 17], 2, 2, torch.float32, LaunchConfig(32, 16, 4, 1)),
]


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"{b[0]}-{'causal' if b[1] else 'bidir'}"
                         f"-q{sum(b[2])}k{sum(b[3])}-{str(b[6])[6:]}")
def test_a_prebuilt_table_gives_the_plain_call_and_the_reference(batch, device, poison_outputs):
    family, causal, q_lens, k_lens, heads, kv_heads, dtype, config = batch
    layout = make_layout(family, heads, kv_heads, max(k_lens), 32, causal)
    q = torch.randn(sum(q_lens), heads, 32, device=device, dtype=dtype)
    k = torch.randn(sum(k_lens), kv_heads, 32, device=device, dtype=dtype)
    v = torch.randn_like(k)
    cq, ck = _cu(q_lens, device), _cu(k_lens, device)
    sequences = varlen_sequences(cq, ck)
    assert isinstance(sequences, VarlenSequences) and sequences.count == len(q_lens)
    assert (sequences.max_q, sequences.max_k) == (max(q_lens), max(k_lens))
    plain = sparse_attention_varlen(q, k, v, cq, ck, layout, config=config)
    built = sparse_attention_varlen(q, k, v, cq, ck, layout, config=config, sequences=sequences)
    torch.testing.assert_close(built, plain, rtol=0, atol=0)
    for i in range(len(q_lens)):
        qs, ks = slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1]))
        ref = reference_attention(q[qs][None], k[ks][None], v[ks][None], layout)[0]
        assert_verbose_close(built[qs], ref, rel_tol(dtype, device), f"sequence {i}")


def test_a_call_with_a_table_reads_nothing_back_and_allocates_only_its_output(device,
                                                                             monkeypatch,
                                                                             allocations):
    lens = [100, 28]
    layout = make_layout("hetero", 2, 1, 100, 32)
    q = torch.randn(sum(lens), 2, 32, device=device)
    k = torch.randn(sum(lens), 1, 32, device=device)
    cu = _cu(lens, device)
    sequences = varlen_sequences(cu, cu)
    sparse_attention_varlen(q, k, k, cu, cu, layout, sequences=sequences)  # plans and config

    def reads(*args):
        raise AssertionError("a call with a sequence table read cu_seqlens back")

    allocations.clear()  # the first call's
    monkeypatch.setattr(kernels.inference, "_lengths", reads)
    monkeypatch.setattr(torch.Tensor, "cpu", reads)  # the grid no longer comes from the device
    out = sparse_attention_varlen(q, k, k, cu, cu, layout, sequences=sequences)
    assert out.shape == q.shape
    assert allocations == [(1, *q.shape)]


def test_the_grid_covers_the_sequence_needing_most_tiles() -> None:
    # A chunk of 40 queries ending at key 160 starts in tile 3 of 32 and ends in tile 4: 2 tiles;
    # a whole sequence of 90 needs 3. The longest query run is not what decides.
    sequences = varlen_sequences(_cu([40, 90], "cpu"), _cu([160, 90], "cpu"))
    assert sequences.tiles(32) == 3
    assert sequences.tiles(128) == 2  # the chunk spans the first two tiles of 128
    assert varlen_sequences(_cu([33], "cpu"), _cu([161], "cpu")).tiles(32) == 2


def test_tables_that_do_not_fit_the_call_are_refused(device):
    layout = make_layout("homo", 2, 2, 128, 32)
    q = torch.randn(100, 2, 32, device=device)
    cu = _cu([60, 40], device)
    with pytest.raises(ValueError, match=r"end at the packed lengths \(q: 100, k: 100\), got q: "
                                         r"0\.\.90"):
        sparse_attention_varlen(q, q, q, cu, cu, layout,
                                sequences=varlen_sequences(_cu([50, 40], device),
                                                           _cu([50, 40], device)))
    with pytest.raises(TypeError, match="sequences must be a VarlenSequences"):
        sparse_attention_varlen(q, q, q, cu, cu, layout, sequences=cu)
    with pytest.raises(ValueError, match="sequences' table is on meta"):
        sparse_attention_varlen(q, q, q, cu, cu, layout,
                                sequences=varlen_sequences(cu, cu, device="meta"))
    with pytest.raises(ValueError, match="the pattern covers 4x4 blocks"):
        long = _cu([200], device)
        sparse_attention_varlen(torch.randn(200, 2, 32, device=device),
                                torch.randn(200, 2, 32, device=device),
                                torch.randn(200, 2, 32, device=device), long, long, layout,
                                sequences=varlen_sequences(long, long))


@pytest.mark.parametrize(("cq", "ck", "error"), [
    ([0, 10, 10], [0, 10, 10], "zero-length sequences are not allowed"),
    ([0, 20], [0, 10], "q_len <= k_len"),
    ([5, 20], [5, 20], "cu_seqlens must start at 0"),
    ([0, 20], [0, 10, 20], "must both have num_seqs \\+ 1 >= 2 entries"),
])
def test_bad_cumulative_lengths_are_refused_when_the_table_is_built(cq, ck, error):
    with pytest.raises(ValueError, match=error):
        varlen_sequences(torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32))
