"""The Gluon fused backward (`kernels/bwd_fused_ws.py`) on Hopper (skipped elsewhere): its
gradients against the float32 reference and the two-kernel backward's, across layouts, causal
and not, ragged and offset lengths, GQA, head sizes and dtypes, and phi-3 at 8k."""

import pytest
import torch

from kernels import default_config, fwd_ws, local_stride_layout, reference_attention
from kernels.attention import gradients
from kernels.bwd_fused_ws import max_stages, refusal, sparse_attention_bwd_fused_ws
from kernels.fwd import sparse_attention_fwd
from tests.kernels.cases import PHI3, make_layout, make_qkv
from tests.tolerances import assert_verbose_close

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
         and fwd_ws.GLUON), reason="needs a Hopper GPU and a triton with Gluon")


def _bhsd(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
    return t.transpose(1, 2) if seq_dim == 1 else t


def _check(q, k, v, layout, seq_dim, scale, stages):
    """The kernel's dq, dk, dv against the reference's and the two kernels'."""
    qv, kv, vv = (_bhsd(t, seq_dim) for t in (q, k, v))
    assert refusal(qv, kv, vv, layout, qv) is None
    config = default_config("fwd", q.device, layout.block_size, q.shape[-1], q.dtype)
    out, lse = sparse_attention_fwd(qv.detach(), kv.detach(), vv.detach(), layout, scale, config)
    dout = torch.randn_like(out)
    got = sparse_attention_bwd_fused_ws(dout, qv.detach(), kv.detach(), vv.detach(), out, lse,
                                        layout, scale, stages)
    two = gradients(dout, qv.detach(), kv.detach(), vv.detach(), out, lse, layout, scale)
    ref = reference_attention(q, k, v, layout, seq_dim=seq_dim, sm_scale=scale, grad=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), _bhsd(dout, seq_dim).float())
    del ref
    for name, g, want, other in zip(("dq", "dk", "dv"), got, ref_grads, two):
        assert g.shape == other.shape and g.dtype == other.dtype, name
        assert torch.isfinite(g).all(), name
        assert_verbose_close(_bhsd(g, seq_dim), want, 1e-2, name)
        # The same 16-bit products summed in another order: far closer to the two kernels'.
        assert_verbose_close(g, other, 2e-3, f"{name} vs the two kernels")


@pytest.mark.parametrize("case", [
    # (family, causal, seq_q, seq_k, heads, kv_heads, dim, block, seq_dim, dtype)
    ("hetero", True, 2048, 2048, 8, 2, 128, 64, 1, torch.bfloat16),
    ("hetero", True, 1000, 1000, 8, 8, 128, 64, 2, torch.float16),  # ragged end
    ("hetero", True, 300, 1000, 8, 4, 128, 64, 1, torch.bfloat16),  # queries are the last 300
    ("hetero", True, 333, 1001, 8, 4, 64, 64, 2, torch.bfloat16),  # odd lengths and offset
    ("random", False, 777, 777, 4, 2, 64, 64, 1, torch.bfloat16),
    ("random", True, 1024, 1024, 4, 2, 128, 128, 2, torch.bfloat16),  # both boxes one block
    ("random", True, 1100, 1100, 4, 2, 128, 64, 1, torch.bfloat16),  # a last pair of one box
    ("dense_heads", True, 3000, 3000, 16, 4, 64, 128, 1, torch.float16),
    ("dense", True, 1024, 1024, 2, 1, 128, 64, 1, torch.bfloat16),
    ("dense", False, 640, 640, 2, 2, 128, 64, 1, torch.bfloat16),
    ("homo", True, 100, 100, 4, 1, 128, 64, 2, torch.bfloat16),  # shorter than one pair
], ids=str)
def test_fused_gluon_backward_matches_reference(case, poison_outputs):
    family, causal, sq, sk, h, hkv, d, bs, seq_dim, dtype = case
    layout = make_layout(family, h, hkv, sk, bs, causal).to("cuda")
    q, k, v = make_qkv(2, sq, sk, h, hkv, d, dtype, "cuda", seq_dim, requires_grad=True)
    _check(q, k, v, layout, seq_dim, d ** -0.5 if d == 128 else 0.1, max_stages(d))


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("kv_heads", [8, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_phi3_fused_gluon_backward_at_8k(head_dim, kv_heads, stages, poison_outputs):
    layout = local_stride_layout(max_seq_len=8192, **PHI3).to("cuda")
    q, k, v = make_qkv(1, 8192, 8192, 32, kv_heads, head_dim, torch.bfloat16, "cuda",
                       requires_grad=True)
    _check(q, k, v, layout, 1, 1 / head_dim, stages)
