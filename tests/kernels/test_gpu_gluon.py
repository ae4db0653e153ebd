"""The Gluon forward on Hopper (skipped elsewhere): outputs and LSE against the float32
reference, and that the Gluon kernel really ran (no silent fallback)."""

import pytest
import torch

from kernels import LaunchConfig, fwd_ws, local_stride_layout, reference_attention, sparse_attention
from tests.kernels.cases import make_layout, make_qkv
from tests.tolerances import assert_verbose_close

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
         and fwd_ws.GLUON), reason="needs a Hopper GPU and a triton with Gluon")

CONFIGS = [LaunchConfig(128, 128, 4, 3, "gluon"), LaunchConfig(128, 64, 4, 2, "gluon")]


# A random 64-key-block case at three stages may take the owned-step form where the dispatch
# says it pays (tests/kernels/test_gpu_halves.py tests that form).
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("case", [
    # (family, causal, seq_q, seq_k, heads, kv_heads, dim, block, seq_dim, dtype)
    ("hetero", True, 2048, 2048, 8, 2, 128, 64, 1, torch.bfloat16),
    ("hetero", True, 1000, 1000, 8, 8, 128, 64, 2, torch.float16),  # ragged end
    ("hetero", True, 300, 1000, 8, 4, 128, 64, 1, torch.bfloat16),  # queries are the last 300
    # The last 512 queries: whole tiles, so the output leaves through tensor-memory stores.
    ("hetero", True, 512, 1024, 8, 2, 128, 64, 1, torch.bfloat16),
    ("random", False, 777, 777, 4, 2, 64, 64, 1, torch.bfloat16),
    ("random", True, 1024, 1024, 4, 2, 128, 128, 2, torch.bfloat16),  # two 64-key boxes a block
    ("dense_heads", True, 3000, 3000, 16, 4, 64, 128, 1, torch.float16),
    ("dense", True, 1024, 1024, 2, 1, 128, 64, 1, torch.bfloat16),
    ("homo", True, 100, 100, 4, 1, 128, 64, 2, torch.bfloat16),  # shorter than one q tile
], ids=str)
def test_gluon_forward_matches_reference(case, config, gluon_launches, poison_outputs):
    family, causal, sq, sk, h, hkv, d, bs, seq_dim, dtype = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(2, sq, sk, h, hkv, d, dtype, "cuda", seq_dim)
    out, lse = sparse_attention(q, k, v, layout, seq_dim=seq_dim, return_lse=True, config=config)
    ref, ref_lse = reference_attention(q, k, v, layout, seq_dim=seq_dim, return_lse=True)
    assert gluon_launches.of("fwd"), "the Gluon kernel did not run"
    assert_verbose_close(out, ref, 1e-2)
    assert_verbose_close(lse, ref_lse, 1e-3, "lse")


def test_phi3_8k_default_is_gluon_and_gradients_flow(gluon_launches, poison_outputs):
    """The default forward at phi-3 shapes is the Gluon kernel; the backward reads its LSE."""
    layout = local_stride_layout(32, 8192, 64, 16, 8, head_sliding_offset=1)
    q, k, v = make_qkv(1, 8192, 8192, 32, 8, 128, torch.bfloat16, "cuda", requires_grad=True)
    out = sparse_attention(q, k, v, layout, sm_scale=1 / 128)
    assert gluon_launches.of("fwd") == ["union"], "the default forward was not the Gluon kernel"
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference_attention(q, k, v, layout, sm_scale=1 / 128, grad=True)
    assert_verbose_close(out, ref, 1e-2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_verbose_close(got, want, 1e-2, name)


def test_strides_tma_cannot_take_fall_back_to_triton(gluon_launches, poison_outputs):
    layout = make_layout("hetero", 8, 2, 1024, 64)
    q, k, v = make_qkv(1, 1024, 1024, 8, 2, 128, torch.bfloat16, "cuda", contiguous=False)
    out = sparse_attention(q, k, v, layout, config=CONFIGS[0])
    assert not gluon_launches.of("fwd")
    assert_verbose_close(out, reference_attention(q, k, v, layout), 1e-2)
