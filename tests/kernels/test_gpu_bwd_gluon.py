"""The backward's Gluon kernels on Hopper (skipped elsewhere): gradients against the float32
reference and the Triton kernels', delta as the dk/dv kernels read it, and that the Gluon kernels
really ran (no silent fallback)."""

import pytest
import torch

from kernels import (
    LaunchConfig,
    fwd_ws,
    local_stride_layout,
    reference_attention,
)
from kernels import sparse_attention
from tests.kernels.cases import PHI3, make_layout, make_qkv
from tests.tolerances import assert_verbose_close

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
         and fwd_ws.GLUON), reason="needs a Hopper GPU and a triton with Gluon")

# (dq config, dk/dv config): each Gluon kernel beside the other's Triton one, and both.
TRITON_DQ, TRITON_DKDV = LaunchConfig(64, 32, 4, 2), LaunchConfig(64, 64, 4, 2)
GLUON_DKDV = LaunchConfig(64, 64, 4, 2, "gluon")
CONFIGS = [(LaunchConfig(128, 64, 4, 3, "gluon"), TRITON_DKDV),
           (LaunchConfig(128, 128, 4, 2, "gluon"), TRITON_DKDV),
           (TRITON_DQ, GLUON_DKDV),
           (LaunchConfig(128, 64, 4, 4, "gluon"), GLUON_DKDV)]


def _grads(q, k, v, layout, dout, seq_dim, scale, configs):
    dq_config, dkdv_config = configs
    out = sparse_attention(q, k, v, layout, seq_dim=seq_dim, sm_scale=scale, dq_config=dq_config,
                           bwd_config=dkdv_config)
    return torch.autograd.grad(out, (q, k, v), dout)


def _check(q, k, v, layout, seq_dim, scale, configs, gluon_launches):
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    grads = _grads(q, k, v, layout, dout, seq_dim, scale, configs)
    for kernel, config in zip(("dq", "bwd"), configs):
        ran = bool(gluon_launches.of(kernel))
        assert ran == (config.impl == "gluon"), (kernel, gluon_launches)
    triton_grads = _grads(q, k, v, layout, dout, seq_dim, scale, (TRITON_DQ, TRITON_DKDV))
    ref = reference_attention(q, k, v, layout, seq_dim=seq_dim, sm_scale=scale, grad=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    del ref
    for name, got, want, other in zip(("dq", "dk", "dv"), grads, ref_grads, triton_grads):
        assert_verbose_close(got, want, 1e-2, name)
        # The same bf16 products summed in another order (and delta, which dk reads): far
        # closer to the Triton kernels' than to the reference.
        assert_verbose_close(got, other, 2e-3, f"{name} vs the Triton kernels")


@pytest.mark.parametrize("configs", CONFIGS, ids=str)
@pytest.mark.parametrize("case", [
    # (family, causal, seq_q, seq_k, heads, kv_heads, dim, block, seq_dim, dtype)
    ("hetero", True, 2048, 2048, 8, 2, 128, 64, 1, torch.bfloat16),
    ("hetero", True, 1000, 1000, 8, 8, 128, 64, 2, torch.float16),  # ragged end
    ("hetero", True, 300, 1000, 8, 4, 128, 64, 1, torch.bfloat16),  # queries are the last 300
    ("hetero", True, 333, 1001, 8, 4, 64, 64, 2, torch.bfloat16),  # odd lengths and offset
    ("random", False, 777, 777, 4, 2, 64, 64, 1, torch.bfloat16),
    ("random", True, 1024, 1024, 4, 2, 128, 128, 2, torch.bfloat16),  # two 64-key boxes a block
    ("dense_heads", True, 3000, 3000, 16, 4, 64, 128, 1, torch.float16),
    ("dense", True, 1024, 1024, 2, 1, 128, 64, 1, torch.bfloat16),
    ("homo", True, 100, 100, 4, 1, 128, 64, 2, torch.bfloat16),  # shorter than one q tile
], ids=str)
def test_gluon_backward_matches_reference(case, configs, gluon_launches, poison_outputs):
    family, causal, sq, sk, h, hkv, d, bs, seq_dim, dtype = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(2, sq, sk, h, hkv, d, dtype, "cuda", seq_dim, requires_grad=True)
    _check(q, k, v, layout, seq_dim, None, configs, gluon_launches)


@pytest.mark.parametrize("kv_heads", [8, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_phi3_gluon_backward_at_8k(head_dim, kv_heads, gluon_launches, poison_outputs):
    layout = local_stride_layout(max_seq_len=8192, **PHI3)
    q, k, v = make_qkv(1, 8192, 8192, 32, kv_heads, head_dim, torch.bfloat16, "cuda",
                       requires_grad=True)
    _check(q, k, v, layout, 1, 1 / head_dim, CONFIGS[-1], gluon_launches)


def test_strides_tma_cannot_take_run_the_triton_kernels(gluon_launches, poison_outputs):
    layout = make_layout("hetero", 8, 2, 1024, 64)
    q, k, v = make_qkv(1, 1024, 1024, 8, 2, 128, torch.bfloat16, "cuda", contiguous=False,
                       requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    grads = _grads(q, k, v, layout, dout, 1, None, CONFIGS[-1])
    assert not gluon_launches.of("dq") and not gluon_launches.of("bwd")
    ref = reference_attention(q, k, v, layout, grad=True)
    for name, got, want in zip(("dq", "dk", "dv"), grads,
                               torch.autograd.grad(ref, (q, k, v), dout.float())):
        assert_verbose_close(got, want, 1e-2, name)
