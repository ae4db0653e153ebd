"""Context parallelism at a real size on a GPU (skipped without one): the phi-3 pattern over 32k
tokens, its keys split into four uneven segments, merged, against the whole sequence."""

import itertools

import pytest
import torch

from kernels import (combine_attn_partitions, local_stride_layout, sparse_attention,
                     sparse_attention_partition)
from tests.tolerances import assert_verbose_close, rel_tol

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEQ = 32768
BOUNDS = (0, 5120, 14336, 23552, SEQ)  # four uneven segments on 64-token block boundaries


@pytest.mark.parametrize("q_start,q_end", [(0, SEQ), (10001, 18000)])  # all queries; a chunk
def test_four_segments_of_32k_merge_to_the_whole_sequence_phi3(q_start, q_end, poison_outputs):
    layout = local_stride_layout(32, SEQ, 64, 16, 8, num_kv_heads=8, head_sliding_offset=1)
    q = torch.randn(1, SEQ, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, SEQ, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    whole, whole_lse = sparse_attention(q, k, v, layout, sm_scale=1 / 128, return_lse=True)
    parts = [sparse_attention_partition(q[:, q_start:q_end], k[:, a:b], v[:, a:b], layout,
                                        q_start, a, sm_scale=1 / 128)
             for a, b in itertools.pairwise(BOUNDS)]
    out, lse = combine_attn_partitions([p[0] for p in parts], [p[1] for p in parts])
    tol = rel_tol(torch.bfloat16, "cuda")
    assert_verbose_close(out, whole[:, q_start:q_end], tol, "merged vs whole")
    assert_verbose_close(lse, whole_lse[:, :, q_start:q_end], tol, "lse vs whole")
