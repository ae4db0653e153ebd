"""The graph-ready inference calls captured in a CUDA graph and replayed on new contents of the
same buffers (skipped without a GPU): a decoding step with a workspace, contiguous and paged, one
split (one kernel) and several (split and merge), and a varlen prefill with its sequence table."""

import pytest
import torch

from kernels import (
    decode_workspace,
    local_stride_layout,
    sparse_attention_decode,
    sparse_attention_varlen,
    varlen_sequences,
)
from tests.kernels.cases import PHI3
from tests.kernels.test_paged_decode import paginate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



def captured(step):
    """``step`` run once on a side stream (compiling, planning, looking its config up), then
    captured; returns the graph and what the captured call returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_a_decoding_step_replays_as_it_runs_eagerly(paged, splits):
    layout = local_stride_layout(max_seq_len=8192, **PHI3)
    lens = [8192, 3000, 1, 5000]
    q = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 8192, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = None
    if paged:
        table, k, v = paginate(lens, 64, k, v, spare=16)
    cache_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    workspace = decode_workspace(q, 8, layout, num_splits=splits)
    assert (workspace.part_out is None) == (workspace.splits == 1)

    def step(**how):
        return sparse_attention_decode(q, k, v, cache_lens, layout, sm_scale=1 / 128,
                                       block_table=table, max_cache_len=8192, **how)

    graph, out = captured(lambda: step(workspace=workspace))
    assert out is workspace.out
    # New queries, cache contents and lengths (and page order) in the same buffers.
    q.copy_(torch.randn_like(q))
    k.copy_(torch.randn_like(k))
    v.copy_(torch.randn_like(v))
    cache_lens.copy_(torch.tensor([4097, 8192, 64, 1], device="cuda", dtype=torch.int32))
    if paged:
        table.copy_(torch.randint(0, k.shape[0], table.shape, device="cuda", dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, step(num_splits=workspace.splits), rtol=0, atol=0)


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda",
                        dtype=torch.int32)


def test_a_varlen_prefill_with_its_table_replays_as_it_runs_eagerly():
    layout = local_stride_layout(max_seq_len=4096, **PHI3)
    q_lens, k_lens = [4096, 1000, 77, 1], [4096, 1000, 300, 2000]  # the last two are chunks
    cq, ck = _cu(q_lens), _cu(k_lens)
    q = torch.randn(sum(q_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(k_lens), 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sequences = varlen_sequences(cq, ck)

    def step(**how):
        return sparse_attention_varlen(q, k, v, cq, ck, layout, sm_scale=1 / 128, **how)

    graph, out = captured(lambda: step(sequences=sequences))
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, step(), rtol=0, atol=0)
