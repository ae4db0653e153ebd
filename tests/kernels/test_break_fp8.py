"""Breaking the fp8 API (kernels.quantize_fp8, dequantize_fp8, sparse_attention_fp8): inputs
whose quantisation or launch went wrong silently or with a cryptic error. Tiny shapes (the
interpreter); kernel launches are blocked where a call must be refused before one."""

from __future__ import annotations

import re

import pytest
import torch

import kernels
import kernels.fp8
from kernels import (
    Fp8Inputs,
    dequantize_fp8,
    local_stride_layout,
    quantize_fp8,
    sparse_attention_fp8,
)


@pytest.fixture
def no_launch(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the call was refused")

    monkeypatch.setattr(kernels.fp8, "sparse_attention_fp8_fwd", launched)


def _qkv(batch=1, seq=32, heads=2, kv_heads=2, dim=16):
    return (torch.randn(batch, seq, heads, dim), torch.randn(batch, seq, kv_heads, dim),
            torch.randn(batch, seq, kv_heads, dim))


def _layout(heads=2, seq=32):
    return local_stride_layout(heads, seq, 16, 2, 3)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_quantize_refuses_inf_and_nan(bad: float, granularity: str) -> None:
    # Was: inf gave a descale of inf (every finite value became 0, inf NaN); NaN gave a descale
    # of 1 and a NaN in the e4m3 tensor, so the kernel's output came out NaN.
    q, k, v = _qkv()
    k[0, 3, 1, 2] = bad
    with pytest.raises(ValueError, match="k holds inf or NaN"):
        quantize_fp8(q, k, v, granularity)


def test_quantize_keeps_subnormal_small_values() -> None:
    # Was: amax / 448 underflowed to 0 for amax under ~6e-43, the descale became 1 and every
    # value quantised to 0 (a nonzero tensor dequantised as zeros).
    q, k, v = _qkv()
    v = v * 1e-44
    x = quantize_fp8(q, k, v, "tensor")
    deq_v = dequantize_fp8(x)[2]
    assert float(x.v_descale) > 0 and deq_v.abs().max() > 0
    # Within what float32's subnormals (steps of 2^-149) and e4m3 can hold.
    assert torch.all((deq_v - v).abs() <= v.abs() * 2.0**-3 + 2.0**-149)


def test_dequantize_refuses_bad_v_descale_and_v_t() -> None:
    # Was: a RuntimeError from torch's broadcasting, an AttributeError for a non-tensor.
    x = quantize_fp8(*_qkv(heads=4, kv_heads=2))
    with pytest.raises(ValueError, match=r"x.v has 2 heads .* but 3 descales"):
        dequantize_fp8(x._replace(v_descale=torch.ones(3)))
    with pytest.raises(ValueError, match=r"x.v_t must be \(batch, kv_heads, dim, seq_k\)"):
        dequantize_fp8(x._replace(v_t=x.k))
    with pytest.raises(TypeError, match="x.q must be a torch.Tensor, got NoneType"):
        dequantize_fp8(x._replace(q=None))


def test_dequantize_takes_the_per_batch_descales_the_kernel_takes() -> None:
    # Was: (batch, heads) descales, which sparse_attention_fp8 takes, were refused with
    # "give the seq_dim it was quantized with".
    q, k, v = _qkv(batch=2, heads=4, kv_heads=2)
    parts = [quantize_fp8(q[b:b + 1], k[b:b + 1], v[b:b + 1], seq_dim=1) for b in range(2)]
    x = Fp8Inputs(*(torch.cat([getattr(p, f) if f in ("q", "k", "v_t") else getattr(p, f)[None]
                               for p in parts]) for f in Fp8Inputs._fields))
    assert x.q_descale.shape == (2, 4)
    for got, *want in zip(dequantize_fp8(x), *(dequantize_fp8(p) for p in parts)):
        torch.testing.assert_close(got, torch.cat(want), rtol=0, atol=0)


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("name", ["q_descale", "k_descale", "v_descale"])
def test_fp8_descales_are_refused_clearly(name: str) -> None:
    # Was: NotImplementedError "isfinite" not implemented for 'Float8_e4m3fn'.
    x = quantize_fp8(*_qkv())
    kwargs = {name: torch.ones(2).to(torch.float8_e4m3fn)}
    with pytest.raises(TypeError, match=f"{name} has dtype torch.float8_e4m3fn"):
        sparse_attention_fp8(x.q, x.k, x.v_t, _layout(), **kwargs)


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("magnitude", [1e16, 1e22])
def test_descales_whose_scores_pass_float32_are_refused(magnitude: float) -> None:
    # Was: 1e22-sized q and k gave q_descale x k_descale x sm_scale = inf in float32, a NaN
    # output; 1e16 gave scores past the kernel's -1e30 row-maximum floor, rows of zeros. The
    # float64 reference of the dequantised inputs is finite and nonzero in both.
    q, k, v = _qkv()
    x = quantize_fp8(q * magnitude, -k.abs() * magnitude, v)
    with pytest.raises(ValueError, match="would pass the fp8 kernel's float32 range"):
        sparse_attention_fp8(x.q, x.k, x.v_t, _layout(), x.q_descale, x.k_descale, x.v_descale)


def test_the_gluon_questions_answer_on_a_machine_without_a_gpu() -> None:
    """Asking about the Gluon fp8 kernel for a CUDA device torch cannot see says why, and the
    default config is the Triton one, rather than torch's error."""
    cuda = torch.device("cuda")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert "torch sees none" in kernels.fp8_gluon_unavailable(cuda)
    assert "interpreter" in kernels.fp8_gluon_unavailable(torch.device("cpu"))
    assert kernels.fp8_default_config(cuda, 64, 128) == kernels.fp8_triton_default(cuda, 64, 128)


def test_a_gluon_config_in_the_interpreter_runs_the_triton_kernel() -> None:
    layout = local_stride_layout(2, 128, 64, 1, 1)
    x = quantize_fp8(*_qkv(seq=128, dim=64), "head")
    args = (x.q, x.k, x.v_t, layout, x.q_descale, x.k_descale, x.v_descale)
    got = sparse_attention_fp8(*args, config=kernels.GLUON_FP8_DEFAULT)
    want = sparse_attention_fp8(*args, config=kernels.fp8_triton_default(x.q.device, 64, 64))
    assert torch.equal(got, want)


def test_an_invalid_gluon_config_is_refused_with_every_reason(no_launch) -> None:
    x = quantize_fp8(*_qkv(seq=64, dim=16), "head")
    with pytest.raises(ValueError, match=r"invalid launch config gluon-m64n32w8s2: block_m=64 "
                                         r"must be 128.*block_n=32 must be 64 or 128.*"
                                         r"num_warps=8.*sparse block size.*head_dim 64 or 128"):
        sparse_attention_fp8(x.q, x.k, x.v_t, _layout(seq=64), x.q_descale, x.k_descale,
                             x.v_descale, config=kernels.LaunchConfig(64, 32, 8, 2, "gluon"))


def test_quantize_refuses_what_no_fp8_call_could_take() -> None:
    # Was: a RuntimeError from .item() on the meta device; q and k of other batches or head
    # dims were quantised, to be refused only by the attention.
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q is on meta; it must be on the CPU or a CUDA"):
        quantize_fp8(q.to("meta"), k.to("meta"), v.to("meta"))
    for k2 in (torch.randn(2, 32, 2, 16), torch.randn(1, 32, 2, 32), torch.randn(1, 32, 3, 16)):
        with pytest.raises(ValueError, match="q and k must share batch and head_dim"):
            quantize_fp8(q, k2, k2.clone())


@pytest.mark.parametrize("descale,error,match", [
    (torch.tensor([-0.5, 1.0]), ValueError, "x.q_descale must be finite and positive, got -0.5"),
    (torch.tensor([float("nan"), 1.0]), ValueError, "must be finite and positive, got nan"),
    (torch.ones(2, dtype=torch.bool), TypeError, "x.q_descale has dtype torch.bool"),
    (torch.ones(2, dtype=torch.int64), TypeError, "x.q_descale has dtype torch.int64"),
    (torch.ones(2, dtype=torch.complex64), TypeError, "x.q_descale has dtype torch.complex64"),
    (torch.ones(2).to(torch.float8_e4m3fn), TypeError, "dtype torch.float8_e4m3fn"),
    (torch.ones(2, device="meta"), ValueError, "x.q_descale is on meta, x.q on cpu"),
])
def test_dequantize_refuses_the_descales_the_kernel_refuses(descale, error, match) -> None:
    # Was: dequantised with them (negative, NaN, True-as-1 or complex values out) or, on
    # another device, a RuntimeError from inside torch.
    x = quantize_fp8(*_qkv())
    with pytest.raises(error, match=re.escape(match)):
        dequantize_fp8(x._replace(q_descale=descale))


def test_a_descale_that_requires_grad_is_refused(no_launch) -> None:
    # Was: the output carried no gradient to it, silently (and a warning from .item()).
    x = quantize_fp8(*_qkv())
    with pytest.raises(ValueError, match="k_descale requires grad"):
        sparse_attention_fp8(x.q, x.k, x.v_t, _layout(), x.q_descale,
                             x.k_descale.clone().requires_grad_(), x.v_descale)
    with torch.no_grad(), pytest.raises(AssertionError, match="launched"):  # past the checks
        sparse_attention_fp8(x.q, x.k, x.v_t, _layout(), x.q_descale,
                             x.k_descale.clone().requires_grad_(), x.v_descale)
