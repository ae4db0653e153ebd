"""The fused backward (the dk/dv kernel's impl "fused"): gradients against the float64
reference's autograd and against the two-kernel backward, gradient buffers poisoned; how a
fused config is chosen, checked and refused."""

import dataclasses
import itertools

import pytest
import torch

import kernels.attention
from kernels import (
    KERNELS,
    LaunchConfig,
    choose_impl,
    config_problems,
    default_config,
    reference_attention,
    select,
    sparse_attention,
)
from tests.kernels.cases import make_layout, make_qkv
from tests.kernels.test_select import caches, put  # noqa: F401 (caches is a fixture)
from tests.tolerances import assert_verbose_close, rel_tol

CPU = torch.device("cpu")

# (family, causal, batch, seq_q, seq_k, heads, kv_heads, dim, block, dtype, seq_dim, contiguous,
#  fused config: None is the dk/dv default with impl="fused")
CASES = [
    ("homo", True, 2, 128, 128, 2, 2, 32, 32, torch.float32, 1, True, None),
    ("hetero", True, 1, 176, 176, 4, 2, 64, 32, torch.bfloat16, 1, True, None),  # GQA, ragged
    ("hetero", False, 1, 176, 176, 2, 2, 64, 32, torch.float32, 2, True, None),  # bidirectional
    ("dense_heads", True, 1, 128, 128, 4, 2, 80, 32, torch.float32, 1, False, None),  # padded d
    ("random", True, 1, 77, 190, 4, 2, 48, 16, torch.bfloat16, 2, True, None),  # q < k by 113
    ("random", False, 1, 96, 224, 2, 1, 64, 32, torch.float32, 1, False, None),  # MQA, q < k
    # kv tiles of half a block, four 16-row query steps per block
    ("dense", True, 1, 130, 130, 2, 1, 96, 64, torch.float32, 2, True,
     LaunchConfig(32, 16, 4, 1, "fused")),
]


def _id(c):
    return (f"{c[0]}-{'causal' if c[1] else 'bidir'}-q{c[3]}k{c[4]}-h{c[5]}kv{c[6]}-d{c[7]}-"
            f"bs{c[8]}-{str(c[9])[6:]}")


def _fused(config: LaunchConfig | None, block: int, dim: int, dtype: torch.dtype) -> LaunchConfig:
    base = config or default_config("bwd", CPU, block, dim, dtype)
    return dataclasses.replace(base, impl="fused")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fused_gradients_match_reference_and_two_kernels(case, device, poison_outputs,
                                                         tile_loads, monkeypatch):
    family, causal, batch, sq, sk, h, hkv, d, bs, dtype, seq_dim, contig, cfg = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(batch, sq, sk, h, hkv, d, dtype, device, seq_dim, contig, requires_grad=True)
    fused = _fused(cfg, bs, d, dtype)
    ran = []
    launcher = kernels.attention.sparse_attention_bwd_fused  # tile_loads' version of it
    monkeypatch.setattr(kernels.attention, "sparse_attention_bwd_fused",
                        lambda *a, **kw: ran.append(a[-1]) or launcher(*a, **kw))

    out = sparse_attention(q, k, v, layout, seq_dim=seq_dim, bwd_config=fused)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert ran == [fused]
    two = torch.autograd.grad(sparse_attention(q, k, v, layout, seq_dim=seq_dim), (q, k, v), dout)
    ref = reference_attention(q, k, v, layout, seq_dim=seq_dim, grad=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
    tol = 2 * rel_tol(dtype, device)
    for name, got, want, other, inp in zip(("dq", "dk", "dv"), grads, ref_grads, two, (q, k, v)):
        assert got.shape == inp.shape and got.dtype == inp.dtype
        assert_verbose_close(got, want, tol, name)
        # The same products in another order (dq's sum runs through atomics), so far closer
        # to each other than to the reference in 16-bit.
        assert_verbose_close(got, other, rel_tol(dtype, device), f"{name} vs two kernels")


def test_a_fused_config_runs_no_dq_kernel_and_ignores_dq_config(device, monkeypatch):
    layout = make_layout("hetero", 2, 1, 96, 32)
    q, k, v = make_qkv(1, 96, 96, 2, 1, 32, torch.float32, device, requires_grad=True)

    def two_kernels(*args, **kw):
        raise AssertionError("the two-kernel backward ran for a fused config")

    monkeypatch.setattr(kernels.attention, "sparse_attention_bwd", two_kernels)
    asked = []
    monkeypatch.setattr(kernels.attention, "_looked_up",
                        lambda kernel, *a: asked.append(kernel) or LaunchConfig(32, 32, 4, 1))
    out = sparse_attention(q, k, v, layout, bwd_config=LaunchConfig(32, 32, 4, 1, "fused"),
                           dq_config=LaunchConfig(16, 16, 4, 1))
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0
    assert asked == []  # neither the dk/dv nor the dq config was looked up


def test_a_tuned_fused_entry_runs_the_fused_backward(caches, device, monkeypatch):  # noqa: F811
    user, _ = caches
    layout = make_layout("hetero", 2, 1, 96, 32)
    q, k, v = make_qkv(1, 96, 96, 2, 1, 32, torch.float32, device, requires_grad=True)
    tuned = LaunchConfig(16, 32, 4, 1, "fused")
    density = select.block_density(layout, 96)
    put(user, select.cache_key("bwd", q.device, q.dtype, 32, 32, 96, density), tuned)
    ran = []
    launcher = kernels.attention.sparse_attention_bwd_fused
    monkeypatch.setattr(kernels.attention, "sparse_attention_bwd_fused",
                        lambda *a, **kw: ran.append(a[-1]) or launcher(*a, **kw))
    out = sparse_attention(q, k, v, layout)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert ran == [tuned]
    ref = reference_attention(q, k, v, layout, grad=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_verbose_close(got, want, 2 * rel_tol(q.dtype, device), name)
    # A fused entry under the dq kernel is not one of its configs: the lookup skips it.
    put(user, select.cache_key("dq", q.device, q.dtype, 32, 32, 96, density), tuned)
    assert select.resolve_config("dq", q, layout, 96)[1] == "default"


def test_the_default_backward_stays_two_kernels():
    for device, dtype in ((CPU, torch.float32), (torch.device("cuda"), torch.bfloat16)):
        # Triton here (no GPU), Gluon on a Hopper GPU: a dk/dv kernel beside the dq kernel.
        assert default_config("bwd", device, 64, 128, dtype).impl in ("triton", "gluon")
    assert KERNELS["bwd"].impls == ("triton", "fused", "gluon")  # "triton" first: the fallback
    assert choose_impl("bwd", "fused", CPU, torch.float32).impl == "fused"
    assert choose_impl("bwd", "triton", CPU, torch.float32).impl == "triton"
    choice = choose_impl("dq", "fused", CPU, torch.float32)
    assert choice.impl == "triton" and "no impl='fused'" in choice.reason


@pytest.mark.parametrize("kernel, bad, problem", [
    ("bwd", LaunchConfig(32, 16, 4, 1, "fused"),
     "block_m=32 must not exceed the sparse block size 16"),
    ("bwd", LaunchConfig(16, 32, 4, 1, "fused"),
     "block_n=32 must not exceed the sparse block size 16"),
    ("bwd", LaunchConfig(16, 12, 4, 1, "fused"), "block_n=12 must be a power of two >= 16"),
    ("bwd", LaunchConfig(16, 16, 3, 1, "fused"), "num_warps=3 must be one of"),
    ("dq", LaunchConfig(16, 16, 4, 1, "fused"), "impl='fused' is the backward's dk/dv kernel"),
    ("fwd", LaunchConfig(16, 16, 4, 1, "fused"), "impl='fused' is the backward's dk/dv kernel"),
])
def test_invalid_fused_configs_raise_naming_the_problem(kernel, bad, problem, device):
    layout = make_layout("hetero", 2, 2, 64, 16)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 32, torch.float32, device, requires_grad=True)
    argument = kernels.attention.CONFIG_ARGUMENTS[kernel]
    with pytest.raises(ValueError, match=f"invalid launch config {bad.short()}: .*{problem}"):
        sparse_attention(q, k, v, layout, **{argument: bad})


def test_every_fused_point_of_the_search_space_is_valid():
    space = KERNELS["bwd"].search_space
    fused = [LaunchConfig(*values) for values in itertools.product(*space.values())
             if values[-1] == "fused"]
    assert len(fused) == 24  # the GPU tune searches them all by default
    for config in fused:
        assert not config_problems(config, 64, 128, "bwd"), config
