"""Breaking the fp8 training API (kernels.sparse_attention_fp8_bwd and
sparse_attention_fp8_trainable): inputs that went wrong silently or with a cryptic error. Tiny
shapes (the interpreter); kernel launches are blocked where a call must be refused before one."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import kernels.fp8_train
from kernels import (
    Fp8BwdConfigs,
    LaunchConfig,
    fp8_bwd_config_problems,
    local_stride_layout,
    quantize_fp8,
    sparse_attention_fp8,
    sparse_attention_fp8_bwd,
    sparse_attention_fp8_trainable,
)

IMPLS = ("fp8", "bf16")
LAYOUT = local_stride_layout(2, 64, 32, 1, 1)


@pytest.fixture
def no_launch(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the call was refused")

    for name in ("sparse_attention_fp8_bwd_views", "_bf16_gradients"):
        monkeypatch.setattr(kernels.fp8_train, name, launched)


def _qkv(batch=1, seq=64, heads=2, dim=32, dtype=torch.bfloat16, requires_grad=False):
    return [torch.randn(batch, seq, heads, dim, dtype=dtype, requires_grad=requires_grad)
            for _ in range(3)]


@pytest.fixture(scope="module")
def problem():
    """``(do, x, out, lse)`` of one forward, (1, 64, 2, 32) in bfloat16."""
    x = quantize_fp8(*_qkv())
    out, lse = sparse_attention_fp8(x.q, x.k, x.v_t, LAYOUT, x.q_descale, x.k_descale,
                                    x.v_descale, return_lse=True)
    return torch.randn_like(out), x, out, lse


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arg", ["do", "out"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e5m2])
def test_do_and_out_in_a_dtype_the_message_does_not_name_are_refused(problem, arg, dtype, impl):
    # Was: any floating dtype but e4m3 passed the check that says "float16, bfloat16 or
    # float32"; e5m2 dO then failed inside torch in the fp8 form ("norm_cpu" not implemented).
    do, x, out, lse = problem
    args = {"do": do, "out": out}
    args[arg] = args[arg].to(dtype)
    with pytest.raises(TypeError, match=f"{arg} has dtype {dtype}; it must be float16"):
        sparse_attention_fp8_bwd(args["do"], x, args["out"], lse, LAYOUT, impl=impl)


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("impl", IMPLS)
def test_a_sparse_do_is_refused(problem, impl):
    # Was: NotImplementedError "Cannot access storage of SparseTensorImpl" (or, in the fp8
    # form, "Could not run 'aten::linalg_vector_norm' ... 'SparseCPU' backend").
    do, x, out, lse = problem
    with pytest.raises(TypeError, match="do must be a dense .strided. tensor"):
        sparse_attention_fp8_bwd(do.to_sparse(), x, out, lse, LAYOUT, impl=impl)


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["k", "v_t"])
def test_x_tensors_on_another_device_are_refused(problem, name, impl):
    # Was: NotImplementedError "Cannot copy out of meta tensor; no data!".
    do, x, out, lse = problem
    bad = x._replace(**{name: getattr(x, name).to("meta")})
    with pytest.raises(ValueError, match=f"x.{name} is on meta, x.q on cpu"):
        sparse_attention_fp8_bwd(do, bad, out, lse, LAYOUT, impl=impl)


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("impl", IMPLS)
def test_everything_on_the_meta_device_is_refused(problem, impl):
    do, x, out, lse = problem
    meta = x._replace(q=x.q.to("meta"), k=x.k.to("meta"), v_t=x.v_t.to("meta"))
    with pytest.raises(ValueError, match="x.q is on meta; it must be on the CPU or a CUDA"):
        sparse_attention_fp8_bwd(do.to("meta"), meta, out.to("meta"), lse.to("meta"), LAYOUT,
                                 impl=impl)


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("descale,error,match", [
    (None, TypeError, "x.k_descale must be a torch.Tensor (quantize_fp8 gives one), got NoneType"),
    (torch.ones(2).to(torch.float8_e4m3fn), TypeError,
     "x.k_descale has dtype torch.float8_e4m3fn; descales are float32"),
    (torch.ones(2, dtype=torch.int64), ValueError, "x.k_descale must be a float tensor"),
], ids=["None", "e4m3", "int64"])
def test_bad_descales_in_x_are_refused(problem, descale, error, match, impl):
    # Was: None taken as 1 (gradients of inputs the forward never saw, NaN here), and an e4m3
    # descale NotImplementedError "isfinite" not implemented for 'Float8_e4m3fn'.
    do, x, out, lse = problem
    with pytest.raises(error, match=re.escape(match)):
        sparse_attention_fp8_bwd(do, x._replace(k_descale=descale), out, lse, LAYOUT, impl=impl)


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("impl", IMPLS)
def test_an_empty_batch_is_refused_as_the_forward_refuses_it(problem, impl):
    # Was: AssertionError "shape must be positive" (bf16), empty gradients (fp8).
    do, x, out, lse = problem
    empty = x._replace(q=x.q[:0], k=x.k[:0], v_t=x.v_t[:0])
    with pytest.raises(ValueError, match="x.q has batch size 0; a call needs at least one"):
        sparse_attention_fp8_bwd(do[:0], empty, out[:0], lse[:0], LAYOUT, impl=impl)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the interpreter
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_do_holding_nan_or_inf_gives_non_finite_gradients(problem, bad, impl):
    # Was (impl fp8): a NaN in dO gave a NaN amax, so a descale of 1, and the pre-pass's clamp
    # made the NaN 448: finite gradients, silently wrong.
    do, x, out, lse = problem
    do = do.clone()
    do[0, 5, 1, 3] = bad
    grads = sparse_attention_fp8_bwd(do, x, out, lse, LAYOUT, impl=impl)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert not torch.isfinite(g[:, :, 1]).all(), name


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_an_lse_holding_nan_or_inf_is_refused_on_the_host(problem, bad, impl):
    # Was: NaN gradients for a NaN, silently zero ones for +inf.
    do, x, out, lse = problem
    lse = lse.clone()
    lse[0, 1, 7] = bad
    with pytest.raises(ValueError, match="lse holds inf or NaN"):
        sparse_attention_fp8_bwd(do, x, out, lse, LAYOUT, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["do", "out", "lse", "sm_scale", "x.q", "x.v_descale"])
def test_an_input_that_asks_for_a_gradient_is_refused(problem, name, impl, monkeypatch):
    # Was: accepted, its gradients carrying no graph (none reached it, silently), and a
    # sm_scale that required grad warned from float().
    do, x, out, lse = problem
    args = {"do": do, "out": out, "lse": lse, "sm_scale": torch.tensor(0.2)}
    fields = {"x.q": "q", "x.v_descale": "v_descale"}
    if name in fields:
        t = getattr(x, fields[name])
        x = x._replace(**{fields[name]: t.detach().clone().requires_grad_(t.is_floating_point())})
    else:
        args[name] = args[name].detach().clone().requires_grad_()
    with pytest.raises(ValueError, match=f"{name} requires grad, but sparse_attention_fp8_bwd "
                                         "is not differentiable"):
        sparse_attention_fp8_bwd(args["do"], x, args["out"], args["lse"], LAYOUT,
                                 sm_scale=args["sm_scale"], impl=impl)
    # Under no_grad, as autograd runs a backward: past the checks, and no warning from float().
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        grads = sparse_attention_fp8_bwd(args["do"], x, args["out"], args["lse"], LAYOUT,
                                         sm_scale=args["sm_scale"], impl=impl)
    assert all(g.shape == do.shape for g in grads)


def _trainable_inputs():
    return _qkv(dtype=torch.float32)


@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp", "forward_ad"])
def test_torch_func_transforms_are_refused_clearly(transform):
    # Was: torch's "must override the setup_context staticmethod" (grad, jvp), "data-dependent
    # control flow" (vmap) and "You must implement the jvp function" (forward-mode AD).
    q, k, v = _trainable_inputs()

    def attention(q):
        return sparse_attention_fp8_trainable(q, k, v, LAYOUT)

    with pytest.raises(RuntimeError, match="sparse_attention_fp8_trainable does not support "
                                           "torch.func transforms"):
        if transform == "grad":
            torch.func.grad(lambda q: attention(q).sum())(q)
        elif transform == "vmap":
            torch.func.vmap(lambda q: attention(q[None])[0])(q.expand(2, -1, -1, -1))
        elif transform == "jvp":
            torch.func.jvp(attention, (q,), (torch.randn_like(q),))
        else:
            with forward_ad.dual_level():
                attention(forward_ad.make_dual(q, torch.randn_like(q)))


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_grad_outputs_are_refused_clearly(impl):
    # Was: NotImplementedError "Cannot access storage of BatchedTensorImpl".
    q, k, v = _trainable_inputs()
    q.requires_grad_()
    out = sparse_attention_fp8_trainable(q, k, v, LAYOUT, bwd_impl=impl)
    with pytest.raises(RuntimeError, match="the fp8 attention's backward cannot run batched"):
        torch.autograd.grad(out, q, torch.randn(2, *out.shape), is_grads_batched=True)


def test_a_learned_sm_scale_is_refused_by_the_trainable():
    # Was: trained through, sm_scale silently given no gradient (and a warning from float()).
    q, k, v = _qkv(requires_grad=True)
    scale = torch.tensor(0.2, requires_grad=True)
    with pytest.raises(ValueError, match="sm_scale requires grad, but the kernels take it as a "
                                         "number"):
        sparse_attention_fp8_trainable(q, k, v, LAYOUT, sm_scale=scale)
    with torch.no_grad(), warnings.catch_warnings():  # nothing to train: taken as a number
        warnings.simplefilter("error", UserWarning)
        out = sparse_attention_fp8_trainable(q, k, v, LAYOUT, sm_scale=scale)
    assert out.shape == q.shape and not out.requires_grad


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("field", ["block_m", "num_stages"])
def test_a_config_of_non_int_fields_is_refused_naming_them(problem, field):
    # Was: Python's TypeError from a comparison ("'<' not supported between instances of 'str'
    # and 'int'", "unsupported operand type(s) for &: 'float' and 'float'").
    do, x, out, lse = problem
    bad = LaunchConfig("32", 32, 4, 1) if field == "block_m" else LaunchConfig(32, 32, 4, 1.0)
    configs = Fp8BwdConfigs(LaunchConfig(32, 32, 4, 1), bad)
    value = "'32'" if field == "block_m" else "1.0"
    assert fp8_bwd_config_problems(configs, 32) == [f"dq: {field}={value} must be an int"]
    with pytest.raises(ValueError, match=re.escape(f"invalid fp8 backward configs: dq: {field}="
                                                   f"{value} must be an int (the configs")):
        sparse_attention_fp8_bwd(do, x, out, lse, LAYOUT, configs=configs, impl="fp8")
    with pytest.raises(TypeError, match="configs must be a kernels.Fp8BwdConfigs, got tuple"):
        fp8_bwd_config_problems(tuple(configs), 32)


def test_the_trainables_bwd_configs_are_checked_before_the_forward(monkeypatch):
    # Was: checked only in the backward, after a whole forward (and a graph) was built.
    def launched(*args, **kwargs):
        raise AssertionError("the forward ran before bwd_configs were checked")

    monkeypatch.setattr(kernels.fp8_train, "sparse_attention_fp8", launched)
    q, k, v = _qkv(requires_grad=True)
    small = LaunchConfig(32, 32, 4, 1)
    with pytest.raises(ValueError, match=r"dkdv: block_m=64 must be a power of two from 32 to "
                                         r"the sparse block size 32.*\(the bwd_configs argument"):
        sparse_attention_fp8_trainable(q, k, v, LAYOUT, bwd_impl="fp8", bwd_configs=Fp8BwdConfigs(
            LaunchConfig(64, 32, 4, 1), small))
    with pytest.raises(TypeError, match="bwd_configs must be a kernels.Fp8BwdConfigs, got tuple"):
        sparse_attention_fp8_trainable(q, k, v, LAYOUT, bwd_impl="fp8", bwd_configs=(small, small))


@pytest.mark.parametrize("impl", IMPLS)
def test_the_trainable_under_the_autograd_uses_a_model_makes(impl):
    """Guards (these worked): inputs asking for no gradient, gradients for some of q, k, v (the
    others get None), no_grad, retain_graph twice (the same gradients), and a clear error for
    double backward."""
    q, k, v = _qkv()
    assert not sparse_attention_fp8_trainable(q, k, v, LAYOUT, bwd_impl=impl).requires_grad
    k.requires_grad_()
    out = sparse_attention_fp8_trainable(q, k, v, LAYOUT, bwd_impl=impl)
    do = torch.randn_like(out)
    out.backward(do, retain_graph=True)
    assert q.grad is None and v.grad is None and k.grad.shape == k.shape
    assert torch.equal(torch.autograd.grad(out, k, do, retain_graph=True)[0], k.grad)
    with pytest.raises(RuntimeError, match="double backward through the fp8 attention is not "
                                           "supported"):
        torch.autograd.grad(out, k, do, create_graph=True)
    with torch.no_grad():
        assert not sparse_attention_fp8_trainable(q, k, v, LAYOUT, bwd_impl=impl).requires_grad
