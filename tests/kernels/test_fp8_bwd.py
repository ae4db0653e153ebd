"""The fp8 backward (kernels/fp8_bwd.py) and the trainable fp8 attention (kernels/fp8_train.py)
on fresh random inputs, outputs poisoned. In the interpreter the kernels run their emulated path
(operands upcast, p rounded to e4m3 by bit arithmetic); the GPU suite (test_gpu_fp8.py) runs the
real one."""

from __future__ import annotations

import os

import pytest
import torch

from kernels import (
    FP8_DTYPE,
    Fp8BwdConfigs,
    LaunchConfig,
    dequantize_fp8,
    fp8_bwd_config_problems,
    quantize_fp8,
    reference_attention,
    sparse_attention_fp8,
    sparse_attention_fp8_bwd,
    sparse_attention_fp8_trainable,
)
from kernels.layout import token_mask
from kernels.reference import layout_head_index
from tests.kernels.cases import make_layout, make_qkv
from tests.tolerances import FP8_BF16_GRAD_TOL, FP8_GRAD_TOL, assert_verbose_close

SMALL = LaunchConfig(32, 32, 4, 1)

# (family, causal, seq_q, seq_k, heads, kv_heads, dim, block, seq_dim, granularity, configs)
CASES = [
    ("hetero", True, 200, 200, 4, 2, 64, 32, 1, "head", None),            # ragged, GQA
    ("hetero", False, 160, 160, 2, 2, 64, 32, 2, "tensor", None),          # bidirectional
    ("random", True, 96, 224, 4, 1, 32, 32, 1, "head", None),              # q shorter, MQA
    ("dense_heads", True, 150, 150, 4, 2, 48, 32, 2, "head", None),        # dim 48 (padded)
    # tiles narrower than the block (sub-tiles in both kernels), and a dq tile of 64 rows
    ("hetero", True, 192, 192, 2, 1, 32, 64, 1, "head",
     Fp8BwdConfigs(LaunchConfig(32, 32, 4, 1), LaunchConfig(64, 32, 4, 1))),
    ("random", False, 130, 250, 2, 2, 32, 64, 2, "tensor",
     Fp8BwdConfigs(LaunchConfig(64, 32, 4, 1), LaunchConfig(32, 64, 4, 1))),
]


def _case_id(c) -> str:
    configs = "default" if c[10] is None else f"{c[10].dkdv.short()}-{c[10].dq.short()}"
    return (f"{c[0]}-{'causal' if c[1] else 'bidir'}-q{c[2]}k{c[3]}-h{c[4]}kv{c[5]}-d{c[6]}-"
            f"bs{c[7]}-{c[9]}-{configs}")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _forward(x, layout, scale, seq_dim):
    return sparse_attention_fp8(x.q, x.k, x.v_t, layout, x.q_descale, x.k_descale, x.v_descale,
                                sm_scale=scale, seq_dim=seq_dim, return_lse=True)


def _reference_grads(x, layout, scale, seq_dim, do):
    deq = [t.detach().requires_grad_() for t in dequantize_fp8(x, seq_dim)]
    ref = reference_attention(*deq, layout, sm_scale=scale, seq_dim=seq_dim, grad=True)
    return torch.autograd.grad(ref, deq, do.to(ref.dtype))


@pytest.mark.parametrize("impl", ["fp8", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gradients_match_the_reference_of_the_dequantised_inputs(case, impl, device,
                                                                 poison_outputs):
    family, causal, sq, sk, h, hkv, d, bs, seq_dim, granularity, configs = case
    if impl == "bf16":
        configs = None  # the 16-bit kernels look theirs up
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(1, sq, sk, h, hkv, d, torch.bfloat16, device, seq_dim)
    x = quantize_fp8(q, k, v, granularity, seq_dim)
    scale = 0.3 if family == "random" else None
    out, lse = _forward(x, layout, scale, seq_dim)
    do = torch.randn_like(out)
    grads = sparse_attention_fp8_bwd(do, x, out, lse, layout, sm_scale=scale, seq_dim=seq_dim,
                                     configs=configs, impl=impl)
    want = _reference_grads(x, layout, scale, seq_dim, do)
    tol = FP8_GRAD_TOL if impl == "fp8" else FP8_BF16_GRAD_TOL
    for name, got, w, like in zip(("dq", "dk", "dv"), grads, want, (q, k, v)):
        assert got.dtype == torch.bfloat16 and got.shape == like.shape, name
        assert_verbose_close(got, w, tol, name)


def _recipe(x, out, lse, do, layout, scale, seq_dim, round_p=True):
    """The backward's arithmetic in float64 on the CPU: dO rounded to e4m3 per (batch, head),
    delta from it, p recomputed from the LSE, and for dv p x 2^8 rounded to e4m3."""
    q, k, v = (t.double() for t in dequantize_fp8(x, seq_dim))
    if seq_dim == 1:
        q, k, v, out, do = (t.transpose(1, 2) for t in (q, k, v, out, do))
    out, do = out.double(), do.double()
    heads, kv_heads = q.shape[1], k.shape[1]
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    descale = do.abs().amax(dim=(2, 3), keepdim=True) / 448.0
    do = (do / descale).clamp(-448, 448).float().to(FP8_DTYPE).double() * descale
    delta = (do * out).sum(-1, keepdim=True)
    mask = token_mask(layout, k.shape[2], q.shape[2])[layout_head_index(heads, kv_heads,
                                                                        layout.heads)]
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.exp(s - lse.double()[..., None]).masked_fill(~mask[None], 0.0)
    p8 = (p * 256).float().to(FP8_DTYPE).double() / 256 if round_p else p
    dv = p8.transpose(-1, -2) @ do
    ds = p * (do @ v.transpose(-1, -2) - delta)
    dq = ds @ k * scale
    dk = ds.transpose(-1, -2) @ q * scale

    def grouped(t):  # summed over each kv head's query heads
        return t.unflatten(1, (kv_heads, heads // kv_heads)).sum(2)

    grads = dq, grouped(dk), grouped(dv)
    return tuple(g.transpose(1, 2) if seq_dim == 1 else g for g in grads)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks the interpreter's emulation to float32 precision; on a GPU dS "
                           "runs in bfloat16 and the fp8 products keep 14 mantissa bits")
@pytest.mark.parametrize("seq_dim", [1, 2])
def test_gradients_follow_the_fp8_recipe(seq_dim, poison_outputs):
    """Against the same quantisation steps in float64: only float32 rounding is left, and a p
    at a midpoint between two e4m3 values (about 1e-4 of dv at most, rare)."""
    torch.manual_seed(1)
    layout = make_layout("hetero", 4, 2, 128, 32, True)
    q, k, v = make_qkv(1, 128, 128, 4, 2, 32, torch.float32, "cpu", seq_dim)
    x = quantize_fp8(q, k, v, "head", seq_dim)
    scale = 0.25
    out, lse = _forward(x, layout, scale, seq_dim)
    # dO with heads of very different sizes: each must get its own descale.
    head_axis = 3 - seq_dim
    sizes = torch.tensor([1.0, 30.0, 0.01, 5.0]).view([1] * head_axis + [4] + [1] * (3 - head_axis))
    do = torch.randn_like(out) * sizes
    got = sparse_attention_fp8_bwd(do, x, out, lse, layout, sm_scale=scale, seq_dim=seq_dim,
                                   grad_dtype=torch.float32, impl="fp8")
    want = _recipe(x, out, lse, do, layout, scale, seq_dim)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_verbose_close(g, w, 1e-4, f"{name} against the recipe")
    # The recipe's rounding of p is what the kernel does: without it dv lies far off.
    unrounded = _recipe(x, out, lse, do, layout, scale, seq_dim, round_p=False)[2]
    assert _rel(got[2], unrounded) > 1e-2


@pytest.mark.parametrize("impl", ["fp8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trainable_attention_trains_the_unquantised_inputs(dtype, impl, device, poison_outputs):
    """Gradients reach the 16- or 32-bit inputs straight through the quantisation, in their
    dtypes; against the unquantised reference the quantisation of q, k, v counts too."""
    layout = make_layout("hetero", 4, 2, 160, 32, True)
    q, k, v = make_qkv(1, 160, 160, 4, 2, 32, dtype, device, requires_grad=True)
    out = sparse_attention_fp8_trainable(q, k, v, layout, bwd_impl=impl)
    assert out.dtype == dtype and out.shape == q.shape
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert [g.dtype for g in grads] == [dtype] * 3
    x = quantize_fp8(q.detach(), k.detach(), v.detach(), "head")
    tol = FP8_GRAD_TOL if impl == "fp8" else FP8_BF16_GRAD_TOL
    for name, got, want in zip(("dq", "dk", "dv"), grads,
                               _reference_grads(x, layout, None, 1, do)):
        assert_verbose_close(got, want, tol, name)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = torch.autograd.grad(reference_attention(qr, kr, vr, layout, grad=True),
                                (qr, kr, vr), do.double())
    for name, got, want in zip(("dq", "dk", "dv"), grads, exact):
        # Each of q, k, v rounds with up to 2^-4 relative error: about 5% more on the gradients.
        assert_verbose_close(got, want, 0.15, f"{name} against the unquantised inputs")
    # A quantisation given is used as it is: the same gradients, bit for bit.
    again = torch.autograd.grad(sparse_attention_fp8_trainable(q, k, v, layout, quantized=x,
                                                               bwd_impl=impl), (q, k, v), do)
    for got, want in zip(again, grads):
        assert torch.equal(got, want)


def test_config_rules() -> None:
    good = Fp8BwdConfigs(LaunchConfig(64, 64, 4, 2), LaunchConfig(32, 64, 8, 1))
    assert fp8_bwd_config_problems(good, 64) == []
    bad = Fp8BwdConfigs(LaunchConfig(64, 16, 4, 2), LaunchConfig(128, 64, 2, 9, "gluon"))
    assert fp8_bwd_config_problems(bad, 64) == [
        "dkdv: block_n=16 must be a power of two from 32 to the sparse block size 64",
        "dq: impl='gluon'; the fp8 backward is Triton only",
        "dq: block_m=128 must be a power of two from 32 to the sparse block size 64",
        "dq: num_warps=2 must be 4 or 8",
        "dq: num_stages=9 must be 1 to 4",
    ]


def test_bad_calls_are_refused_naming_the_argument(device) -> None:
    layout = make_layout("hetero", 2, 2, 64, 32, True)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 32, torch.bfloat16, device)
    x = quantize_fp8(q, k, v, "head")
    out, lse = _forward(x, layout, None, 1)
    do = torch.randn_like(out)
    with pytest.raises(TypeError, match="expected the Fp8Inputs quantize_fp8 returns"):
        sparse_attention_fp8_bwd(do, (x.q, x.k, x.v_t), out, lse, layout)
    with pytest.raises(ValueError, match=r"do must have shape \(1, 64, 2, 32\)"):
        sparse_attention_fp8_bwd(do[:, :32], x, out, lse, layout)
    with pytest.raises(TypeError, match="out has dtype torch.float8_e4m3fn"):
        sparse_attention_fp8_bwd(do, x, out.to(FP8_DTYPE), lse, layout)
    with pytest.raises(ValueError, match=r"lse must be the forward's float32 \(batch, heads, "):
        sparse_attention_fp8_bwd(do, x, out, lse[..., :10], layout)
    with pytest.raises(TypeError, match="grad_dtype must be"):
        sparse_attention_fp8_bwd(do, x, out, lse, layout, grad_dtype=torch.int8)
    with pytest.raises(TypeError, match="configs must be a kernels.Fp8BwdConfigs"):
        sparse_attention_fp8_bwd(do, x, out, lse, layout, configs=SMALL, impl="fp8")
    with pytest.raises(ValueError, match="invalid fp8 backward configs: dkdv: block_m=64"):
        sparse_attention_fp8_bwd(do, x, out, lse, layout, impl="fp8",
                                 configs=Fp8BwdConfigs(LaunchConfig(64, 32, 4, 1), SMALL))
    with pytest.raises(ValueError, match="impl must be one of fp8, bf16, gluon, got 'e5m2'"):
        sparse_attention_fp8_bwd(do, x, out, lse, layout, impl="e5m2")
    with pytest.raises(ValueError, match="impl='bf16' runs the 16-bit backward"):
        sparse_attention_fp8_bwd(do, x, out, lse, layout, impl="bf16",
                                 configs=Fp8BwdConfigs(SMALL, SMALL))
    with pytest.raises(ValueError, match="bwd_impl must be one of fp8, bf16, gluon, got 'fp16'"):
        sparse_attention_fp8_trainable(q, k, v, layout, bwd_impl="fp16")
    with pytest.raises(ValueError, match="bwd_impl='bf16' runs the 16-bit backward"):
        sparse_attention_fp8_trainable(q, k, v, layout, bwd_impl="bf16",
                                       bwd_configs=Fp8BwdConfigs(SMALL, SMALL))
    with pytest.raises(ValueError, match="impl='gluon' runs the 16-bit dq kernel at its looked-up "
                                         "config and a Gluon dk/dv kernel of fixed tiles"):
        sparse_attention_fp8_bwd(do, x, out, lse, layout, impl="gluon",
                                 configs=Fp8BwdConfigs(SMALL, SMALL))
    with pytest.raises(TypeError, match="q has dtype torch.float8_e4m3fn; it must be float16"):
        sparse_attention_fp8_trainable(x.q, x.k, x.k, layout)
    with pytest.raises(ValueError, match=r"quantized holds q \(1, 64, 2, 32\)"):
        sparse_attention_fp8_trainable(q[:, :32], k, v, layout, quantized=x)
    leaf = torch.zeros_like(x.q).requires_grad_()
    with pytest.raises(NotImplementedError, match="train through sparse_attention_fp8_trainable"):
        sparse_attention_fp8(leaf, x.k, x.v_t, layout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal off a Hopper GPU")
def test_the_gluon_form_says_where_it_runs() -> None:
    """Off a Hopper GPU the "gluon" form refuses, naming why and what runs anywhere, and the
    trainable form says so before its forward runs."""
    layout = make_layout("hetero", 2, 2, 64, 64, True)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 64, torch.bfloat16, "cpu", requires_grad=True)
    x = quantize_fp8(q.detach(), k.detach(), v.detach(), "head")
    out, lse = _forward(x, layout, None, 1)
    with pytest.raises(ValueError, match=r"impl='gluon' cannot take this call: the Gluon fp8 "
                                         r"dk/dv kernel runs on a Hopper GPU only \(impl='bf16' "
                                         r"runs anywhere\)"):
        sparse_attention_fp8_bwd(torch.randn_like(out), x, out, lse, layout, impl="gluon")
    with pytest.raises(ValueError, match="bwd_impl='gluon' cannot take this call"):
        sparse_attention_fp8_trainable(q, k, v, layout, bwd_impl="gluon")


@pytest.mark.parametrize("group", [1, 2])
def test_the_do_prepass_reorders_dot_for_the_gluon_kernel(group, device, poison_outputs):
    """quantised_do's two forms from one kernel: dO in e4m3 with one descale per (batch, group
    of heads), dOᵀ plain or with its queries reordered within runs of 32 (zeros past seq_q), and
    delta of the quantised dO. A ragged length, so the last run is partial."""
    from kernels.fp8_bwd import quantised_do

    b, h, sq, d = 1, 4, 100, 32
    sizes = torch.tensor([1.0, 30.0, 0.01, 5.0], device=device).view(1, h, 1, 1)
    do = (torch.randn(b, sq, h, d, device=device).transpose(1, 2) * sizes).to(torch.bfloat16)
    out = torch.randn(b, sq, h, d, device=device, dtype=torch.bfloat16).transpose(1, 2)
    want_descale = do.float().abs().unflatten(1, (h // group, group)).amax(dim=(2, 3, 4)) / 448
    per_head = want_descale.repeat_interleave(group, dim=1)[:, :, None, None]
    want8 = (do.float() / per_head).clamp(-448, 448).to(FP8_DTYPE).float()
    m = torch.arange(sq)
    pos = (m & ~31) | (m & 16) | ((m & 6) << 1) | ((m & 8) >> 2) | (m & 1)
    for reorder in (False, True):
        do8, do8_t, delta, descale = quantised_do(do, out, group, reorder)
        assert torch.equal(descale, want_descale)
        assert torch.equal(do8.float(), want8)
        if reorder:
            assert do8_t.shape[-1] == 128
            want_t = torch.zeros(b, h, d, 128, device=device)
            want_t[..., pos.to(device)] = want8.transpose(2, 3)
        else:
            want_t = want8.transpose(2, 3)
        assert torch.equal(do8_t.float(), want_t), reorder
        assert_verbose_close(delta, (want8 * per_head * out.float()).sum(-1), 1e-5, "delta")
    # Without the reordering the two transposes differ: the test sees it.
    assert not torch.equal(quantised_do(do, out, group)[1].float(), want_t[..., :sq])
    # A NaN in dO stays in its group's descale (a descale of 1 would clamp it to 448, finite).
    do[0, 1, 7, 3] = float("nan")
    descale = quantised_do(do, out, group, reorder=True)[3]
    assert torch.isnan(descale[0, 1 // group]) and not torch.isnan(descale[0, -1])
