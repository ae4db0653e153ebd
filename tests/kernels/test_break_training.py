"""An adversarial pass over the training path of sparse_attention and SparseAttention: what
autograd cannot get through the kernels is refused with a clear error, never a dropped gradient
or a crash inside a kernel launch; what it can is compared against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import kernels.attention
from kernels import (
    LaunchConfig,
    SparseAttention,
    local_stride_layout,
    reference_attention,
    sparse_attention,
)
from tests.kernels.cases import make_layout, make_qkv
from tests.tolerances import assert_verbose_close, rel_tol


def _problem(device, requires_grad=True):
    layout = make_layout("hetero", 2, 2, 64, 16)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 16, torch.float32, device, requires_grad=requires_grad)
    return layout, q, k, v


def test_a_scale_that_requires_grad_is_refused_not_silently_dropped(device):
    # A learned temperature: the kernels take the scale as a number, so its gradient would be
    # None (the reference gives one). Detached, or without grad, it still runs.
    layout, q, k, v = _problem(device)
    scale = torch.tensor(0.3, requires_grad=True)
    with pytest.raises(ValueError, match="sm_scale requires grad"):
        sparse_attention(q, k, v, layout, sm_scale=scale)
    with pytest.raises(ValueError, match="sm_scale requires grad"):
        SparseAttention(16, layout.pattern)(q, k, v, sm_scale=scale)
    want = reference_attention(q, k, v, layout, sm_scale=0.3)
    with torch.no_grad():
        out = sparse_attention(q, k, v, layout, sm_scale=scale)
    assert_verbose_close(out, want, 2 * rel_tol(torch.float32, device))
    out = sparse_attention(q, k, v, layout, sm_scale=scale.detach())
    assert_verbose_close(out, want, 2 * rel_tol(torch.float32, device))


@pytest.mark.parametrize("how", ["is_grads_batched", "vectorized_jacobian"])
def test_a_batched_backward_is_refused_clearly(how, device):
    # vmap over the backward used to reach the kernel launch with a BatchedTensor grad:
    # "NotImplementedError: Cannot access storage of BatchedTensorImpl".
    layout, q, k, v = _problem(device)
    with pytest.raises(RuntimeError, match="backward cannot run batched"):
        if how == "is_grads_batched":
            out = sparse_attention(q, k, v, layout)
            torch.autograd.grad(out, q, torch.randn(2, *out.shape, device=device),
                                is_grads_batched=True)
        else:
            torch.autograd.functional.jacobian(
                lambda q: sparse_attention(q, k, v, layout)[0, :2, 0, 0], q, vectorize=True)


@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev"])
def test_torch_func_transforms_are_refused_naming_the_way_that_works(transform, device):
    # Without this, PyTorch's refusal asks the caller to override a setup_context staticmethod.
    layout, q, k, v = _problem(device, requires_grad=False)
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        if transform == "grad":
            torch.func.grad(lambda q: sparse_attention(q, k, v, layout).sum())(q)
        elif transform == "vmap":
            torch.func.vmap(lambda q: sparse_attention(q, k, v, layout))(q[None])
        else:
            torch.func.jacrev(lambda q: sparse_attention(q, k, v, layout)[0, 0, 0, :2])(q)


@pytest.mark.parametrize("bwd", [LaunchConfig(16, 16, 4, 1, "fused"), LaunchConfig(16, 16, 4, 1)])
def test_the_module_takes_the_backward_configs(bwd, device, monkeypatch):
    # SparseAttention.forward took the forward's config only: a module could not run the fused
    # backward, nor pin either backward kernel's tiles.
    layout, q, k, v = _problem(device)
    ran = []
    for name in ("sparse_attention_bwd", "sparse_attention_bwd_fused"):
        launcher = getattr(kernels.attention, name)

        def recorded(*args, _launcher=launcher, _name=name, **kwargs):
            ran.append((_name, args[-1] if _name.endswith("fused") else args[-2:]))
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(kernels.attention, name, recorded)
    module = SparseAttention(16, layout.pattern, causal=layout.causal)
    dq_config = LaunchConfig(32, 16, 4, 1)
    out = module(q, k, v, bwd_config=bwd, dq_config=dq_config)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    if bwd.impl == "fused":
        assert ran == [("sparse_attention_bwd_fused", bwd)]
    else:
        assert ran == [("sparse_attention_bwd", (bwd, dq_config))]
    ref = reference_attention(q, k, v, module.layout, grad=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_verbose_close(got, want, 2 * rel_tol(torch.float32, device), name)


@pytest.mark.parametrize("argument, config, problem", [
    ("config", LaunchConfig(16, 32, 4, 1), "block_n=32 must not exceed"),
    ("bwd_config", LaunchConfig(16, 32, 4, 1, "fused"), "block_n=32 must not exceed"),
    ("dq_config", LaunchConfig(16, 32, 4, 1), "block_n=32 must not exceed"),
])
def test_a_bad_config_names_the_argument_that_gave_it(argument, config, problem, device):
    # The same config can be wrong for all three kernels with one message: say which one it was.
    layout, q, k, v = _problem(device)
    with pytest.raises(ValueError, match=rf"{problem} .*\(the {argument} argument\)"):
        sparse_attention(q, k, v, layout, **{argument: config})


def test_a_compiled_model_runs_the_attention_outside_its_graph() -> None:
    # Dynamo cannot trace the kernels' launches (in the interpreter it fails inside Triton): a
    # compiled model takes a graph break there, and its output and gradients are eager's.
    layout = local_stride_layout(2, 64, 16, 2, 3)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))

    def model(q, k, v):
        return sparse_attention(q, k, v, layout, seq_dim=2).sin()

    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = model(q, k, v)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    assert torch.equal(out, want)
    for got, expected in zip(grads, want_grads):
        assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
