"""Gradients against the float64 reference's autograd, gradient buffers poisoned."""

import pytest
import torch

from kernels import LaunchConfig, reference_attention, sparse_attention
from kernels.columns import build_column_plan
from tests.kernels.cases import make_layout, make_qkv
from tests.tolerances import assert_verbose_close, rel_tol

# (family, causal, batch, seq_q, seq_k, heads, kv_heads, dim, block, dtype, seq_dim, contiguous,
#  fwd config, dk/dv config, dq config)
CASES = [
    ("homo", True, 2, 128, 128, 2, 2, 32, 32, torch.float32, 1, True, None, None, None),
    ("hetero", True, 1, 200, 200, 4, 2, 64, 32, torch.float16, 1, True, None, None, None),  # GQA
    ("hetero", False, 1, 200, 200, 4, 4, 64, 32, torch.float32, 2, True, None, None, None),  # bidir
    ("dense_heads", True, 1, 160, 160, 4, 2, 80, 32, torch.float32, 1, False, None, None, None),
    ("random", True, 1, 77, 190, 4, 2, 48, 16, torch.float16, 2, True, None, None, None),  # q < k
    ("random", False, 1, 96, 224, 2, 1, 64, 32, torch.float32, 1, False, None, None, None),  # MQA
    # dq tiles spanning 4 sparse blocks; dk/dv tiles inside one
    ("hetero", True, 1, 250, 250, 4, 2, 64, 16, torch.float32, 1, True,
     LaunchConfig(64, 16, 4, 1), LaunchConfig(16, 16, 4, 1), LaunchConfig(64, 16, 4, 1)),
    # q shorter than k by 113 rows: the first dq tile of 32 rows starts before the first query
    ("random", True, 1, 77, 190, 4, 2, 48, 16, torch.float16, 2, True,
     None, None, LaunchConfig(32, 16, 4, 1)),
    ("dense", True, 1, 130, 130, 2, 1, 96, 64, torch.float32, 2, True,
     None, LaunchConfig(64, 32, 4, 1), LaunchConfig(128, 64, 4, 1)),
]


def _id(c):
    return (f"{c[0]}-{'causal' if c[1] else 'bidir'}-q{c[3]}k{c[4]}-h{c[5]}kv{c[6]}-d{c[7]}-"
            f"bs{c[8]}-{str(c[9])[6:]}")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gradients_match_reference(case, device, poison_outputs, tile_loads):
    family, causal, batch, sq, sk, h, hkv, d, bs, dtype, seq_dim, contig, cfg, bcfg, dqcfg = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(batch, sq, sk, h, hkv, d, dtype, device, seq_dim, contig, requires_grad=True)
    out = sparse_attention(q, k, v, layout, seq_dim=seq_dim, config=cfg, bwd_config=bcfg,
                           dq_config=dqcfg)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference_attention(q, k, v, layout, seq_dim=seq_dim, grad=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
    tol = 2 * rel_tol(dtype, device)
    for name, got, want, inp in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert got.shape == inp.shape and got.dtype == inp.dtype
        assert_verbose_close(got, want, tol, name)


def test_packed_qkv_gradients(device):
    # q, k, v as views of one packed (batch, seq, 3, heads, dim) tensor: no copies, right grads.
    layout = make_layout("hetero", 2, 2, 128, 32)
    qkv = torch.randn(1, 128, 3, 2, 32, device=device, requires_grad=True)
    q, k, v = qkv.unbind(2)
    out = sparse_attention(q, k, v, layout)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    ref = reference_attention(q, k, v, layout, grad=True)
    (ref_grad,) = torch.autograd.grad(ref, qkv, dout.double())
    assert_verbose_close(grad, ref_grad, 2 * rel_tol(torch.float32, device), "dqkv")


def test_lse_output_and_gradient_together(device):
    layout = make_layout("hetero", 2, 2, 96, 32)
    q, k, v = make_qkv(1, 96, 96, 2, 2, 32, torch.float32, device, requires_grad=True)
    out, lse = sparse_attention(q, k, v, layout, return_lse=True)
    assert not lse.requires_grad
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0


def test_double_backward_raises(device):
    layout = make_layout("hetero", 2, 2, 64, 32)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 32, torch.float32, device, requires_grad=True)
    out = sparse_attention(q, k, v, layout)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_bwd_config_must_fit_sparse_block(device):
    layout = make_layout("hetero", 2, 2, 64, 16)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 32, torch.float32, device, requires_grad=True)
    with pytest.raises(ValueError, match="block_m=32 must not exceed the sparse block size 16"):
        sparse_attention(q, k, v, layout, bwd_config=LaunchConfig(32, 16, 4, 1))


def test_dq_config_is_checked_before_launch(device):
    layout = make_layout("hetero", 2, 2, 64, 16)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 32, torch.float32, device, requires_grad=True)
    with pytest.raises(ValueError, match="block_n=32 must not exceed the sparse block size 16"):
        sparse_attention(q, k, v, layout, dq_config=LaunchConfig(32, 32, 4, 1))


def test_column_plan_skips_blocks_before_first_query():
    layout = make_layout("dense", 1, 1, 256, 32)
    plan = build_column_plan(layout, seq_q=40, seq_k=256)  # queries at positions 216..255
    for j in range(plan.kv_blocks):
        rows = plan.q_block[plan.col_ptr[j]:plan.col_ptr[j + 1]].tolist()
        # Blocks 0-5 hold no query. Block 6 straddles the first query, so it is masked and sorts
        # after block 7, which is unmasked below the diagonal and masked on it (j == 7).
        assert rows == ([7, 6] if j < 7 else [7]), (j, rows)
        assert int(plan.n_full[j]) == (1 if j < 7 else 0), j
