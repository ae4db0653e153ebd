"""The Gluon forward and dq kernels on owned steps (kernels/fwd_halves.py,
kernels/bwd_dq_halves.py) on Hopper (skipped elsewhere): outputs, LSE and gradients against the
float32 reference on patterns whose tile halves keep different blocks, and that these forms
really ran."""

import pytest
import torch

from kernels import (
    BlockLayout,
    LaunchConfig,
    halves_plan,
    random_layout,
    reference_attention,
    sparse_attention,
)
from tests.kernels.cases import make_qkv
from tests.kernels.test_gpu_gluon import pytestmark  # noqa: F401 - the same skip
from tests.tolerances import assert_verbose_close

GLUON_BWD = LaunchConfig(64, 64, 4, 2, "gluon")


def _lonely_halves(blocks: int) -> BlockLayout:
    """Non-causal: each tile's upper half keeps blocks its lower half does not, one query block
    keeps a single block, and one tile's halves keep one block each."""
    pattern = torch.rand(4, blocks, blocks, generator=torch.Generator().manual_seed(3)) < 0.3
    pattern[:, :, 0] = True
    pattern[:, 5, 1:] = False
    pattern[:, 6:8, 1:] = False
    return BlockLayout.from_pattern(pattern, 64, causal=False, warn_kv_cache=False)


def _check_gradients(q, k, v, layout, seq_dim, out, ref, configs) -> None:
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_verbose_close(got, want, 1e-2, f"{name} {configs}")


@pytest.mark.parametrize("dq_config", [LaunchConfig(128, 64, 4, 4, "gluon"),
                                       LaunchConfig(128, 64, 4, 3, "gluon")], ids=str)
@pytest.mark.parametrize("case", [
    # (density or None for _lonely_halves, causal, seq_q, seq_k, heads, kv_heads, dim, seq_dim,
    # dtype)
    (0.05, True, 2048, 2048, 8, 2, 128, 1, torch.bfloat16),
    (0.3, True, 2048, 2048, 8, 2, 128, 1, torch.bfloat16),
    (0.7, True, 2048, 2048, 8, 8, 128, 2, torch.bfloat16),
    (0.3, True, 1000, 1000, 8, 2, 64, 2, torch.float16),  # ragged end
    (0.3, True, 300, 1000, 8, 4, 128, 1, torch.bfloat16),  # the last 300 queries: pointer stores
    (0.3, True, 512, 1024, 8, 2, 128, 1, torch.bfloat16),  # whole tiles: tensor-memory stores
    (0.4, False, 777, 777, 4, 2, 64, 1, torch.bfloat16),
    (None, False, 768, 768, 4, 1, 128, 1, torch.bfloat16),
], ids=str)
def test_owned_steps_match_reference(case, dq_config, gluon_launches, poison_outputs,
                                     monkeypatch):
    # Short sequences whose owned steps would not pay by the dispatch's estimate take them here.
    monkeypatch.setattr(halves_plan, "halves_pay", lambda *args: True)
    density, causal, sq, sk, h, hkv, d, seq_dim, dtype = case
    blocks = -(-sk // 64)
    layout = (_lonely_halves(blocks) if density is None
              else random_layout(h, blocks, 64, density, seed=11, causal=causal))
    q, k, v = make_qkv(2, sq, sk, h, hkv, d, dtype, "cuda", seq_dim, requires_grad=True)
    out, lse = sparse_attention(q, k, v, layout, seq_dim=seq_dim, return_lse=True,
                                config=LaunchConfig(128, 128, 4, 3, "gluon"),
                                bwd_config=GLUON_BWD, dq_config=dq_config)
    ref, ref_lse = reference_attention(q, k, v, layout, seq_dim=seq_dim, return_lse=True,
                                       grad=True)
    assert gluon_launches.of("fwd") == ["halves"]
    assert_verbose_close(out, ref, 1e-2)
    assert_verbose_close(lse, ref_lse, 1e-3, "lse")
    _check_gradients(q, k, v, layout, seq_dim, out, ref, dq_config)
    assert gluon_launches.of("dq") == ["halves"]


def test_head_dim_64_four_forward_stages_and_128_key_dq_steps(gluon_launches, poison_outputs,
                                                              monkeypatch):
    """Four 128-key forward stages, and three 128-key dq stages, fit at head_dim 64 only."""
    monkeypatch.setattr(halves_plan, "halves_pay", lambda *args: True)
    layout = random_layout(8, 32, 64, 0.3, seed=2)
    q, k, v = make_qkv(2, 2048, 2048, 8, 2, 64, torch.bfloat16, "cuda", requires_grad=True)
    dq_config = LaunchConfig(128, 128, 4, 3, "gluon")
    out, lse = sparse_attention(q, k, v, layout, return_lse=True,
                                config=LaunchConfig(128, 128, 4, 4, "gluon"),
                                bwd_config=GLUON_BWD, dq_config=dq_config)
    ref, ref_lse = reference_attention(q, k, v, layout, return_lse=True, grad=True)
    assert gluon_launches.of("fwd") == ["halves"]
    assert_verbose_close(out, ref, 1e-2)
    assert_verbose_close(lse, ref_lse, 1e-3, "lse")
    _check_gradients(q, k, v, layout, 1, out, ref, dq_config)
    assert gluon_launches.of("dq") == ["halves"]


def test_owned_steps_by_default_at_8k_and_their_gradients(gluon_launches, poison_outputs):
    """The patterns sweep's density at 8k, default configs: both kernels take owned steps."""
    layout = random_layout(8, 128, 64, 0.2, seed=0)
    q, k, v = make_qkv(1, 8192, 8192, 8, 2, 128, torch.bfloat16, "cuda", requires_grad=True)
    out = sparse_attention(q, k, v, layout, sm_scale=1 / 128)
    assert gluon_launches.of("fwd") == ["halves"], "the default forward took the union's steps"
    ref = reference_attention(q, k, v, layout, sm_scale=1 / 128, grad=True)
    assert_verbose_close(out, ref, 1e-2)
    _check_gradients(q, k, v, layout, 1, out, ref, "default")
    assert gluon_launches.of("dq") == ["halves"], "the default dq kernel took the union's steps"


@pytest.mark.parametrize("config", [LaunchConfig(128, 64, 4, 3, "gluon"),
                                    LaunchConfig(128, 64, 4, 4, "gluon")], ids=str)
@pytest.mark.parametrize("case", [
    # (density or None for _lonely_halves, causal, seq_q, seq_k, heads, kv_heads, dim, dtype)
    (0.05, True, 2048, 2048, 8, 2, 128, torch.bfloat16),
    (0.3, True, 1000, 1000, 8, 2, 64, torch.float16),  # ragged end
    (0.3, True, 300, 1000, 8, 4, 128, torch.bfloat16),  # the last 300 queries
    (None, False, 768, 768, 4, 1, 128, torch.bfloat16),
], ids=str)
def test_owned_steps_of_one_block_a_step_forward(case, config, gluon_launches, poison_outputs,
                                                 monkeypatch):
    """The forward on owned steps of one 64-key block each (block_n 64): its consumers count
    the item's steps as the loader does (they once took two blocks a step whatever the config,
    and the kernel never ended)."""
    monkeypatch.setattr(halves_plan, "halves_pay", lambda *args: True)
    density, causal, sq, sk, h, hkv, d, dtype = case
    blocks = -(-sk // 64)
    layout = (_lonely_halves(blocks) if density is None
              else random_layout(h, blocks, 64, density, seed=5, causal=causal))
    q, k, v = make_qkv(2, sq, sk, h, hkv, d, dtype, "cuda", 1)
    out, lse = sparse_attention(q, k, v, layout, return_lse=True, config=config)
    ref, ref_lse = reference_attention(q, k, v, layout, return_lse=True)
    assert gluon_launches.of("fwd") == ["halves"]
    assert_verbose_close(out, ref, 1e-2)
    assert_verbose_close(lse, ref_lse, 1e-3, "lse")
