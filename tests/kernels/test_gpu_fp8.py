"""The fp8 forward on a GPU (skipped without one): the real e4m3 path (fp8 tensor-core products,
the hardware cast of p) at real sizes, against the float32 reference of the dequantised inputs,
and the error against our bf16 kernel on the unquantised inputs reported beside it."""

import pytest
import torch

from kernels import (
    FP8_DTYPE,
    GLUON_FP8_DEFAULT,
    LaunchConfig,
    dequantize_fp8,
    local_stride_layout,
    quantize_fp8,
    reference_attention,
    sparse_attention,
    sparse_attention_fp8,
    sparse_attention_fp8_bwd,
    sparse_attention_fp8_trainable,
)
from kernels import fp8_ws
from tests.kernels.cases import PHI3, make_layout, make_qkv
from tests.tolerances import (
    FP8_BF16_GRAD_TOL,
    FP8_END_TO_END_TOL,
    FP8_GRAD_TOL,
    FP8_LSE_TOL,
    assert_verbose_close,
    rel_tol,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _fp8(x, layout, **kwargs):
    return sparse_attention_fp8(x.q, x.k, x.v_t, layout, x.q_descale, x.k_descale, x.v_descale,
                                **kwargs)


def _assert_gluon_takes(x, layout, config, seq_dim=1):
    """A Gluon config must run the Gluon kernel, not fall back to the Triton one."""
    if config is not None and config.impl == "gluon":
        q, k = (x.q, x.k) if seq_dim == 2 else (x.q.transpose(1, 2), x.k.transpose(1, 2))
        assert fp8_ws.refusal(q, k, x.v_t, layout) is None


@pytest.mark.parametrize("granularity", ["head", "tensor"])
@pytest.mark.parametrize("config", [None, LaunchConfig(64, 64, 4, 2), LaunchConfig(128, 128, 8, 2),
                                    LaunchConfig(64, 128, 4, 3), LaunchConfig(128, 64, 8, 3),
                                    LaunchConfig(128, 128, 4, 3, "gluon"),
                                    LaunchConfig(128, 64, 4, 2, "gluon"),
                                    LaunchConfig(128, 64, 4, 4, "gluon")],
                         ids=str)
def test_phi3_at_8k(config, granularity, poison_outputs, capsys):
    layout = local_stride_layout(max_seq_len=8192, **PHI3)
    q, k, v = make_qkv(1, 8192, 8192, 32, 8, 128, torch.bfloat16, "cuda")
    x = quantize_fp8(q, k, v, granularity)
    _assert_gluon_takes(x, layout, config)
    out, lse = _fp8(x, layout, sm_scale=1 / 128, config=config, return_lse=True)
    ref, ref_lse = reference_attention(*dequantize_fp8(x), layout, sm_scale=1 / 128,
                                       return_lse=True)
    bf16 = sparse_attention(q, k, v, layout, sm_scale=1 / 128)
    with capsys.disabled():
        print(f"\nfp8 phi-3 8k {config.short() if config else 'default'} {granularity}: rel err "
              f"{_rel(out, ref):.4f} vs the dequantised reference, {_rel(out, bf16):.4f} vs "
              "the bf16 kernel")
    assert_verbose_close(out, ref, rel_tol(FP8_DTYPE, "cuda"))
    assert_verbose_close(lse, ref_lse, FP8_LSE_TOL["cuda"], "lse")
    del ref
    assert_verbose_close(out, bf16, FP8_END_TO_END_TOL, "out against the bf16 kernel")


def test_a_graph_captured_before_any_eager_call_makes_its_own_ones(monkeypatch):
    """The Gluon forward's row sums take a tile of ones made on first use. Captured into a CUDA
    graph before any eager call on the device has made it, the graph must make its own (the
    cache stays empty) and replay to the eager output; the next eager call keeps one."""
    layout = local_stride_layout(max_seq_len=2048, **PHI3)
    q, k, v = make_qkv(2, 2048, 2048, 32, 8, 128, torch.bfloat16, "cuda")
    x = quantize_fp8(q, k, v)
    _assert_gluon_takes(x, layout, GLUON_FP8_DEFAULT)

    def step():
        return _fp8(x, layout, sm_scale=1 / 128, config=GLUON_FP8_DEFAULT)

    side = torch.cuda.Stream()  # compile and plan once, off the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step().clone()
    torch.cuda.current_stream().wait_stream(side)
    monkeypatch.setattr(fp8_ws, "_ONES", {})  # as on a device no eager call has used
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    assert fp8_ws._ONES == {}
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert torch.equal(step(), eager) and len(fp8_ws._ONES) == 1


@pytest.mark.parametrize("case", [
    # (family, causal, seq_q, seq_k, heads, kv_heads, dim, block, seq_dim, config)
    ("hetero", False, 4096, 4096, 16, 4, 128, 64, 1, None),
    ("random", True, 1000, 8000, 8, 8, 80, 64, 2, None),  # q shorter, dim 80, ragged
    ("dense_heads", True, 6000, 6000, 16, 4, 64, 128, 1, None),
    ("random", False, 3000, 5000, 8, 2, 256, 32, 1, None),  # dim 256
    ("homo", True, 8192, 8192, 8, 1, 96, 16, 2, LaunchConfig(128, 128, 8, 2)),  # gathers 8
    ("hetero", True, 4000, 4000, 8, 2, 128, 64, 1, LaunchConfig(128, 32, 4, 2)),  # sub-tiles
    # The Gluon kernel: ragged lengths, q shorter than k, plain heads, head_dim 64, block 128.
    ("hetero", False, 4096, 4096, 16, 4, 128, 64, 1, GLUON_FP8_DEFAULT),
    ("random", True, 1000, 8000, 8, 8, 128, 64, 2, GLUON_FP8_DEFAULT),
    ("dense_heads", True, 6000, 6000, 16, 4, 64, 128, 1, LaunchConfig(128, 64, 4, 3, "gluon")),
    ("homo", True, 3001, 3001, 8, 1, 128, 64, 2, LaunchConfig(128, 64, 4, 2, "gluon")),
    ("random", False, 2000, 5000, 8, 2, 64, 256, 1, GLUON_FP8_DEFAULT),
], ids=str)
def test_layout_families(case, poison_outputs):
    family, causal, sq, sk, h, hkv, d, bs, seq_dim, config = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(1, sq, sk, h, hkv, d, torch.bfloat16, "cuda", seq_dim, contiguous=False)
    x = quantize_fp8(q, k, v, "head", seq_dim)
    _assert_gluon_takes(x, layout, config, seq_dim)
    out, lse = _fp8(x, layout, seq_dim=seq_dim, return_lse=True, config=config)
    ref, ref_lse = reference_attention(*dequantize_fp8(x, seq_dim), layout, seq_dim=seq_dim,
                                       return_lse=True)
    assert_verbose_close(out, ref, rel_tol(FP8_DTYPE, "cuda"))
    assert_verbose_close(lse, ref_lse, FP8_LSE_TOL["cuda"], "lse")
    exact = reference_attention(q, k, v, layout, seq_dim=seq_dim)
    assert_verbose_close(out, exact, FP8_END_TO_END_TOL, "out against the unquantised inputs")


# -- the backward (kernels/fp8_bwd.py) -------------------------------------------------------------


def _reference_grads(x, layout, do, seq_dim=1, sm_scale=None):
    deq = [t.detach().requires_grad_() for t in dequantize_fp8(x, seq_dim)]
    ref = reference_attention(*deq, layout, sm_scale=sm_scale, seq_dim=seq_dim, grad=True)
    return torch.autograd.grad(ref, deq, do.float())


@pytest.mark.parametrize("impl", ["fp8", "bf16", "gluon"])
@pytest.mark.parametrize("kv_heads", [8, 32], ids=lambda n: f"kv{n}")
@pytest.mark.parametrize("dim", [64, 128], ids=lambda d: f"d{d}")
def test_phi3_gradients_at_8k(kv_heads, dim, impl, poison_outputs, capsys):
    """The trainable fp8 attention's gradients at phi-3's pattern, 8k tokens, grouped and plain
    heads: against the float32 reference of the dequantised inputs, and (reported) against our
    bf16 kernel's on the unquantised inputs."""
    layout = local_stride_layout(max_seq_len=8192, **{**PHI3, "num_kv_heads": kv_heads})
    q, k, v = make_qkv(1, 8192, 8192, 32, kv_heads, dim, torch.bfloat16, "cuda",
                       requires_grad=True)
    out = sparse_attention_fp8_trainable(q, k, v, layout, sm_scale=1 / 128, bwd_impl=impl)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    bf16 = torch.autograd.grad(sparse_attention(q, k, v, layout, sm_scale=1 / 128), (q, k, v), do)
    x = quantize_fp8(q.detach(), k.detach(), v.detach(), "head")
    want = _reference_grads(x, layout, do, sm_scale=1 / 128)
    errors = {n: (_rel(g, w), _rel(g, b)) for n, g, w, b in zip(("dq", "dk", "dv"), grads, want,
                                                                 bf16)}
    with capsys.disabled():
        print(f"\nfp8 grads ({impl} backward) phi-3 8k kv{kv_heads} d{dim}: " + ", ".join(
            f"{n} {a:.4f} vs the dequantised reference, {b:.4f} vs bf16"
            for n, (a, b) in errors.items()))
    # "gluon" takes dk and dv in e4m3 (the fp8 budget), dq in bf16.
    tols = {"fp8": [FP8_GRAD_TOL] * 3, "bf16": [FP8_BF16_GRAD_TOL] * 3,
            "gluon": [FP8_BF16_GRAD_TOL, FP8_GRAD_TOL, FP8_GRAD_TOL]}[impl]
    for name, got, w, tol in zip(("dq", "dk", "dv"), grads, want, tols):
        assert_verbose_close(got, w, tol, name)


@pytest.mark.parametrize("case", [
    # (family, causal, seq_q, seq_k, heads, kv_heads, dim, block, seq_dim)
    ("hetero", False, 4096, 4096, 16, 4, 128, 64, 1),
    ("random", True, 1000, 8000, 8, 8, 80, 64, 2),  # q shorter, dim 80, ragged
    ("dense_heads", True, 6000, 6000, 16, 4, 64, 128, 1),
    ("homo", True, 3001, 3001, 8, 1, 128, 64, 2),
], ids=str)
@pytest.mark.parametrize("impl", ["fp8", "bf16", "gluon"])
def test_gradient_layout_families(case, impl, poison_outputs):
    family, causal, sq, sk, h, hkv, d, bs, seq_dim = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(1, sq, sk, h, hkv, d, torch.bfloat16, "cuda", seq_dim, contiguous=False)
    x = quantize_fp8(q, k, v, "head", seq_dim)
    out, lse = _fp8(x, layout, seq_dim=seq_dim, return_lse=True)
    do = torch.randn_like(out)
    if impl == "gluon" and (d not in (64, 128) or (sk - sq) % 32):
        with pytest.raises(ValueError, match="impl='gluon' cannot take this call"):
            sparse_attention_fp8_bwd(do, x, out, lse, layout, seq_dim=seq_dim, impl=impl)
        return
    grads = sparse_attention_fp8_bwd(do, x, out, lse, layout, seq_dim=seq_dim, impl=impl)
    tols = {"fp8": [FP8_GRAD_TOL] * 3, "bf16": [FP8_BF16_GRAD_TOL] * 3,
            "gluon": [FP8_BF16_GRAD_TOL, FP8_GRAD_TOL, FP8_GRAD_TOL]}[impl]
    for name, got, want, tol in zip(("dq", "dk", "dv"), grads,
                                    _reference_grads(x, layout, do, seq_dim), tols):
        assert_verbose_close(got, want, tol, name)
