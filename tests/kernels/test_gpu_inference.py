"""Inference kernels at real sizes on a GPU (skipped without one), bf16 against float32."""

import pytest
import torch

from kernels import (decode_workspace, local_stride_layout, reference_attention,
                     sparse_attention_decode, sparse_attention_varlen)
from tests.kernels.cases import PHI3
from tests.kernels.test_paged_decode import paginate
from tests.tolerances import assert_verbose_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



def test_varlen_prefill_and_chunks_phi3(poison_outputs):
    layout = local_stride_layout(max_seq_len=8192, **PHI3)
    k_lens = [8192, 3000, 517, 6000]
    q_lens = [8192, 3000, 100, 1]  # the last two are chunks at the end of longer sequences
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda",  # noqa: E731
                                   dtype=torch.int32)
    q = torch.randn(sum(q_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(k_lens), 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cq, ck = cu(q_lens), cu(k_lens)
    out = sparse_attention_varlen(q, k, v, cq, ck, layout, sm_scale=1 / 128)
    for i in range(len(q_lens)):
        qs, ks = slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1]))
        ref = reference_attention(q[qs][None], k[ks][None], v[ks][None], layout, sm_scale=1 / 128)[0]
        assert_verbose_close(out[qs], ref, 1e-2, f"sequence {i}")


@pytest.mark.parametrize("splits", [None, 1, 8])
def test_decode_phi3_long_context(splits, poison_outputs):
    layout = local_stride_layout(max_seq_len=65536, **PHI3)
    lens = [65536, 40000, 1, 12345]
    q = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 65536, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = sparse_attention_decode(q, k, v, torch.tensor(lens, device="cuda"), layout,
                                  sm_scale=1 / 128, num_splits=splits)
    for b, n in enumerate(lens):
        ref = reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n], layout,
                                  sm_scale=1 / 128)[0, 0]
        assert_verbose_close(out[b], ref, 1e-2, f"sequence {b}")


@pytest.mark.parametrize("page_size", [64, 16])
def test_paged_decode_32k_batch8_matches_contiguous(page_size, poison_outputs):
    layout = local_stride_layout(max_seq_len=32768, **PHI3)
    lens = [32768, 20000, 1, 32767, 777, 16384, 64 * 300 + 5, 31000]
    q = torch.randn(8, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(8, 32768, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table, k_pages, v_pages = paginate(lens, page_size, k, v)
    cache_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    contiguous = sparse_attention_decode(q, k, v, cache_lens, layout, sm_scale=1 / 128)
    paged = sparse_attention_decode(q, k_pages, v_pages, cache_lens, layout, sm_scale=1 / 128,
                                    block_table=table, max_cache_len=32768)
    assert_verbose_close(paged, contiguous, 1e-3, f"page {page_size} vs contiguous")
    for b in (0, 2, 6):
        n = lens[b]
        ref = reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n], layout,
                                  sm_scale=1 / 128)[0, 0]
        assert_verbose_close(paged[b], ref, 1e-2, f"sequence {b}")


def test_paged_decode_with_a_workspace_replays_in_a_cuda_graph():
    """A paged step with a workspace reads nothing back and allocates nothing, so it captures:
    replayed on new queries, cache contents, lengths and pages, it gives the eager answer."""
    layout = local_stride_layout(max_seq_len=8192, **PHI3)
    lens = [8192, 3000, 1, 5000]
    q = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 8192, 8, 128, device="cuda", dtype=torch.bfloat16)
    table, k_pages, v_pages = paginate(lens, 64, k, torch.randn_like(k), spare=16)
    cache_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    workspace = decode_workspace(q, 8, layout)

    def step():
        return sparse_attention_decode(q, k_pages, v_pages, cache_lens, layout, sm_scale=1 / 128,
                                       block_table=table, max_cache_len=8192, workspace=workspace)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, plan and look the config up before capturing
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    assert captured is workspace.out
    # New contents in the same buffers: queries, every page, lengths and the page order.
    q.copy_(torch.randn_like(q))
    k_pages.copy_(torch.randn_like(k_pages))
    v_pages.copy_(torch.randn_like(v_pages))
    cache_lens.copy_(torch.tensor([4097, 8192, 64, 1], device="cuda", dtype=torch.int32))
    table.copy_(torch.randint(0, k_pages.shape[0], table.shape, device="cuda", dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    eager = sparse_attention_decode(q, k_pages, v_pages, cache_lens, layout, sm_scale=1 / 128,
                                    block_table=table, max_cache_len=8192,
                                    num_splits=workspace.splits)
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
