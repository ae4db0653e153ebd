"""The fused backward at real sizes on a GPU (skipped without one): phi-3's pattern at 8k, bf16,
against the float32 reference and the two-kernel backward."""

import pytest
import torch

from kernels import (
    LaunchConfig,
    local_stride_layout,
    reference_attention,
    sparse_attention,
)
from tests.kernels.cases import PHI3, make_qkv
from tests.tolerances import assert_verbose_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("config", [LaunchConfig(64, 64, 4, 2, "fused"),
                                    LaunchConfig(64, 32, 8, 2, "fused")], ids=str)
@pytest.mark.parametrize("kv_heads", [8, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_phi3_fused_gradients_at_8k(head_dim, kv_heads, config, poison_outputs):
    layout = local_stride_layout(max_seq_len=8192, **PHI3)
    q, k, v = make_qkv(1, 8192, 8192, 32, kv_heads, head_dim, torch.bfloat16, "cuda",
                       requires_grad=True)
    scale = 1 / head_dim
    out = sparse_attention(q, k, v, layout, sm_scale=scale, bwd_config=config)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    two = torch.autograd.grad(sparse_attention(q, k, v, layout, sm_scale=scale), (q, k, v), dout)
    ref = reference_attention(q, k, v, layout, sm_scale=scale, grad=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    del ref
    for name, got, want, other in zip(("dq", "dk", "dv"), grads, ref_grads, two):
        assert_verbose_close(got, want, 1e-2, name)
        # The same bf16 products summed in another order: far closer than to the reference.
        assert_verbose_close(got, other, 2e-3, f"{name} vs two kernels")
