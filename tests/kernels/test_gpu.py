"""Real sizes on a GPU (skipped without one): bf16/fp16 against the float32 reference."""

import pytest
import torch

from kernels import LaunchConfig, local_stride_layout, reference_attention, sparse_attention
from tests.kernels.cases import PHI3, make_layout, make_qkv
from tests.tolerances import assert_verbose_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [None, LaunchConfig(64, 64, 4, 3), LaunchConfig(128, 64, 8, 3),
                                    LaunchConfig(128, 32, 4, 2)], ids=str)
def test_phi3_at_8k(dtype, config, poison_outputs):
    layout = local_stride_layout(max_seq_len=8192, **PHI3)
    q, k, v = make_qkv(1, 8192, 8192, 32, 8, 128, dtype, "cuda")
    out = sparse_attention(q, k, v, layout, sm_scale=1 / 128, config=config)
    ref = reference_attention(q, k, v, layout, sm_scale=1 / 128)
    assert_verbose_close(out, ref, 1e-2)


@pytest.mark.parametrize("case", [
    # (family, causal, seq_q, seq_k, heads, kv_heads, dim, block, seq_dim)
    ("hetero", False, 4096, 4096, 16, 4, 128, 64, 1),
    ("random", True, 1000, 8000, 8, 8, 80, 64, 2),
    ("dense_heads", True, 6000, 6000, 16, 4, 64, 128, 1),
    ("random", False, 3000, 5000, 8, 2, 256, 32, 1),
    ("homo", True, 8192, 8192, 8, 1, 96, 16, 2),
], ids=str)
def test_layout_families_bf16(case, poison_outputs, tile_loads):
    family, causal, sq, sk, h, hkv, d, bs, seq_dim = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(1, sq, sk, h, hkv, d, torch.bfloat16, "cuda", seq_dim, contiguous=False)
    out, lse = sparse_attention(q, k, v, layout, seq_dim=seq_dim, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, layout, seq_dim=seq_dim, return_lse=True)
    assert_verbose_close(out, ref, 1e-2)
    assert_verbose_close(lse, ref_lse, 1e-3, "lse")


@pytest.mark.parametrize("bwd_config,dq_config", [
    (None, None),
    (LaunchConfig(64, 32, 4, 2), LaunchConfig(128, 64, 8, 3)),
    (LaunchConfig(64, 64, 8, 2), LaunchConfig(64, 64, 4, 2)),
], ids=str)
def test_phi3_gradients_at_8k(bwd_config, dq_config, poison_outputs):
    layout = local_stride_layout(max_seq_len=8192, **PHI3)
    q, k, v = make_qkv(1, 8192, 8192, 32, 8, 128, torch.bfloat16, "cuda", requires_grad=True)
    out = sparse_attention(q, k, v, layout, sm_scale=1 / 128, bwd_config=bwd_config,
                           dq_config=dq_config)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference_attention(q, k, v, layout, sm_scale=1 / 128, grad=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    del ref
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_verbose_close(got, want, 1e-2, name)


@pytest.mark.parametrize("case", [
    ("hetero", False, 4096, 4096, 16, 4, 128, 64, 1),
    ("random", True, 1000, 6000, 8, 8, 80, 64, 2),
    ("dense_heads", True, 5000, 5000, 16, 4, 64, 128, 1),
], ids=str)
def test_gradients_layout_families_bf16(case, poison_outputs, tile_loads):
    family, causal, sq, sk, h, hkv, d, bs, seq_dim = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(1, sq, sk, h, hkv, d, torch.bfloat16, "cuda", seq_dim, contiguous=False,
                       requires_grad=True)
    out = sparse_attention(q, k, v, layout, seq_dim=seq_dim)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference_attention(q, k, v, layout, seq_dim=seq_dim, grad=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_verbose_close(got, want, 1e-2, name)


@pytest.mark.parametrize("kv_heads", [8, 32], ids=lambda n: f"kv{n}")
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
def test_phi3_gradients_grouped_and_plain_heads(kv_heads, head_dim, poison_outputs):
    """The backward at 8k with the configs a launch picks, for grouped (8 kv heads) and plain
    (32) heads, head_dim 64 and 128 (the fused backward's own: test_gpu_bwd_fused.py)."""
    layout = local_stride_layout(max_seq_len=8192, **PHI3)
    q, k, v = make_qkv(1, 8192, 8192, 32, kv_heads, head_dim, torch.bfloat16, "cuda",
                       requires_grad=True)
    scale = 1 / head_dim
    out = sparse_attention(q, k, v, layout, sm_scale=scale)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference_attention(q, k, v, layout, sm_scale=scale, grad=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    del ref
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_verbose_close(got, want, 1e-2, name)
