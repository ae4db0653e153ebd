"""Inference kernels at real sizes on a GPU (skipped without one), bf16 against float32."""

import pytest
import torch

from kernels import (local_stride_layout, reference_attention, sparse_attention_decode,
                     sparse_attention_varlen)
from tests.tolerances import assert_verbose_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PHI3 = dict(num_heads=32, block_size=64, local_blocks=16, vert_stride=8, head_sliding_offset=1)


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
