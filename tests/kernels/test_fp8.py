"""The fp8 forward (kernels/fp8.py) and its quantisation (kernels/quant.py) on fresh random inputs,
outputs poisoned. In the interpreter the kernel runs its emulated path (operands upcast, p
rounded to e4m3 by bit arithmetic); the GPU suite (test_gpu_fp8.py) runs the real one."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import kernels
import kernels.fp8
from kernels import (
    FP8_DTYPE,
    Fp8Inputs,
    LaunchConfig,
    dense_layout,
    dequantize_fp8,
    fp8_config_problems,
    fp8_default_config,
    quantize_fp8,
    reference_attention,
    sparse_attention_fp8,
)
from kernels.fp8 import _round_e4m3
from tests.kernels.cases import make_layout, make_qkv
from tests.tolerances import (
    FP8_END_TO_END_TOL,
    FP8_LSE_TOL,
    assert_verbose_close,
    rel_tol,
)


def _run(x, layout, **kwargs):
    return sparse_attention_fp8(x.q, x.k, x.v_t, layout, x.q_descale, x.k_descale, x.v_descale,
                                **kwargs)


@pytest.fixture(params=["tma", "pointers"])
def fp8_loads(request, monkeypatch):
    """Both load paths of the fp8 forward: tensor descriptors where the config allows them (steps
    no wider than a sparse block) and pointer tiles (``tma=False``)."""
    asked = []
    real = kernels.fp8.sparse_attention_fp8_fwd

    def recorded(*args, **kwargs):
        kwargs.setdefault("tma", request.param == "tma")
        asked.append(kwargs["tma"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.fp8, "sparse_attention_fp8_fwd", recorded)
    yield request.param
    assert asked == [request.param == "tma"] * len(asked) and asked, asked


# (family, causal, seq_q, seq_k, heads, kv_heads, dim, block, seq_dim, granularity, config)
CASES = [
    ("hetero", True, 200, 200, 4, 2, 64, 32, 1, "head", None),            # ragged, GQA
    ("hetero", False, 160, 160, 2, 2, 64, 32, 2, "tensor", None),          # bidirectional
    ("random", True, 96, 224, 4, 1, 32, 32, 1, "head", None),              # q shorter, MQA
    ("dense_heads", True, 150, 150, 4, 2, 48, 32, 2, "head", None),        # dim 48 (padded)
    # steps gathering 2 and 4 kept blocks; block_m over two blocks (row bits)
    ("hetero", True, 250, 250, 4, 2, 64, 16, 1, "head", LaunchConfig(32, 32, 4, 1)),
    ("random", False, 130, 250, 2, 2, 32, 16, 2, "tensor", LaunchConfig(32, 64, 4, 1)),
    ("hetero", True, 256, 256, 2, 1, 32, 32, 1, "head", LaunchConfig(64, 64, 4, 1)),
    # steps narrower than the block (sub-tiles), and tiles narrower than the block
    ("hetero", True, 192, 192, 2, 2, 32, 64, 1, "head", LaunchConfig(16, 32, 4, 1)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'causal' if c[1] else 'bidir'}-"
                         f"q{c[2]}k{c[3]}-h{c[4]}kv{c[5]}-d{c[6]}-bs{c[7]}-{c[9]}-"
                         f"{c[10].short() if c[10] else 'default'}")
def test_forward_matches_the_reference_of_its_dequantised_inputs(case, device, poison_outputs,
                                                                 fp8_loads):
    family, causal, sq, sk, h, hkv, d, bs, seq_dim, granularity, config = case
    layout = make_layout(family, h, hkv, sk, bs, causal)
    q, k, v = make_qkv(1, sq, sk, h, hkv, d, torch.bfloat16, device, seq_dim)
    x = quantize_fp8(q, k, v, granularity, seq_dim)
    scale = 0.3 if family == "random" else None
    out, lse = _run(x, layout, sm_scale=scale, seq_dim=seq_dim, return_lse=True, config=config)
    ref, ref_lse = reference_attention(*dequantize_fp8(x, seq_dim), layout, sm_scale=scale,
                                       seq_dim=seq_dim, return_lse=True)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert_verbose_close(out, ref, rel_tol(FP8_DTYPE, device), "out")
    assert_verbose_close(lse, ref_lse, FP8_LSE_TOL[torch.device(device).type], "lse")
    # End to end, against the unquantised inputs: wrong descales would fail here even where the
    # dequantised reference shares the mistake.
    exact = reference_attention(q, k, v, layout, sm_scale=scale, seq_dim=seq_dim)
    assert_verbose_close(out, exact, FP8_END_TO_END_TOL, "out against the unquantised inputs")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks the interpreter's emulation to float32 precision; on a GPU "
                           "q kᵀ sums with fp8 products' 14 mantissa bits (test_gpu_fp8.py)")
def test_one_step_rows_follow_the_fp8_recipe_exactly(device):
    """Rows of one kv step: the output is that of p = 2^8 exp2(s - max), rounded to the nearest
    e4m3 value, times v8, over the unrounded row sum, descaled. Wide scores (sm_scale 0.5) put
    many p under e4m3's normal range, where the 2^8 shift is what keeps them."""
    layout = dense_layout(2, 32, causal=False)
    # Fixed inputs: a p within float32 rounding of the midpoint between two e4m3 values may round
    # either way in the kernel and in the recipe (about one draw in 40 has one), and one such p
    # moves the output by ~5e-5. These inputs have none, so the comparison can be exact.
    torch.manual_seed(0)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 32, torch.float32, device)
    x = quantize_fp8(q, k, v, "head")
    scale = 0.5
    out = _run(x, layout, sm_scale=scale, config=LaunchConfig(32, 64, 4, 1),
               out_dtype=torch.float32)

    def recipe(shift: float) -> torch.Tensor:
        q8, k8 = x.q.float().transpose(1, 2), x.k.float().transpose(1, 2)
        descale = (x.q_descale * x.k_descale).view(1, 2, 1, 1)
        s = (q8 @ k8.transpose(-1, -2)) * (scale * math.log2(math.e) * descale)
        p = torch.exp2(s - s.amax(-1, keepdim=True) + shift)
        pv = p.to(FP8_DTYPE).float() @ x.v_t.float().transpose(2, 3)
        return (pv / p.sum(-1, keepdim=True) * x.v_descale.view(1, 2, 1, 1)).transpose(1, 2)

    assert_verbose_close(out, recipe(8.0), 1e-5, "out against the recipe")
    unshifted = float((out.double() - recipe(0.0).double()).norm() / out.double().norm())
    assert unshifted > 1e-3, "the 2^8 shift of p changed nothing: the test cannot see it"


@triton.jit
def _round_kernel(X, Out, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Out + offs, _round_e4m3(tl.load(X + offs)))


def test_emulated_rounding_is_the_casts(device):
    """The interpreter's rounding of p (bit arithmetic) against torch's float32 -> e4m3 cast
    (round to nearest even): normal values, subnormals, exact ties, both signs, saturation."""
    gen = torch.Generator().manual_seed(0)
    mags = torch.exp2(torch.empty(3000).uniform_(-12, math.log2(448.0), generator=gen))
    # Midpoints between neighbouring e4m3 values: ties go to the even mantissa.
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8_DTYPE).float()
    ties = (grid[:-1] + grid[1:]) / 2
    x = torch.cat([mags, -mags, ties, -ties, torch.tensor([0.0, 448.0, 1000.0, -1e6])])
    n = triton.next_power_of_2(x.numel())
    padded = torch.zeros(n)
    padded[:x.numel()] = x
    padded, out = padded.to(device), torch.empty(n, device=device)
    _round_kernel[(1,)](padded, out, N=n)
    want = x.clamp(-448.0, 448.0).to(FP8_DTYPE).float()
    got = out[:x.numel()].cpu()
    bad = (got != want).nonzero().flatten()
    assert not len(bad), [(float(x[i]), float(got[i]), float(want[i])) for i in bad[:5]]


# -- quantisation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_quantize_scales_each_head_to_e4m3s_range(seq_dim: int, granularity: str) -> None:
    q, k, v = make_qkv(2, 40, 40, 4, 2, 32, torch.bfloat16, "cpu", seq_dim)
    head_axis = 3 - seq_dim
    q = q * torch.arange(1, 5, dtype=q.dtype).view([1] * head_axis + [4] + [1] * (3 - head_axis))
    x = quantize_fp8(q, k, v, granularity, seq_dim)
    assert x.q.dtype == x.k.dtype == x.v_t.dtype == FP8_DTYPE
    assert x.q.shape == q.shape and x.k.shape == k.shape
    assert x.v_t.shape == (2, 2, 32, 40) and x.v_t.stride(-1) == 1
    assert x.v_t.stride(-2) % 16 == 0  # the key axis padded: tensor-memory copies can read it
    heads = {"tensor": (1, 1, 1), "head": (4, 2, 2)}[granularity]
    assert tuple(d.numel() for d in (x.q_descale, x.k_descale, x.v_descale)) == heads
    assert all(d.dtype == torch.float32 for d in (x.q_descale, x.k_descale, x.v_descale))
    # The largest magnitude of each scaled unit lands on 448.
    dims = [i for i in range(4) if i != head_axis] if granularity == "head" else list(range(4))
    assert torch.all(x.q.float().abs().amax(dim=dims) == 448.0)
    # Dequantised values sit within half an e4m3 step (2^-4 relative) of the originals, in the
    # layout they came in (v too).
    for name, got, want, descale in zip("qkv", dequantize_fp8(x, seq_dim), (q, k, v),
                                        (x.q_descale, x.k_descale, x.v_descale)):
        want = want.float()
        # Under e4m3's normal range (2^-6 of a unit's scale) steps are absolute, 2^-9 of it.
        floor = 2.0**-10 * descale.max()
        assert torch.all((got - want).abs() <= want.abs() * 2.0**-4 + floor), name


def test_quantize_leaves_an_all_zero_head_zero() -> None:
    q, k, v = make_qkv(1, 32, 32, 2, 2, 16, torch.float32, "cpu")
    k[:, :, 1] = 0.0
    x = quantize_fp8(q, k, v, "head")
    assert float(x.k_descale[1]) == 1.0 and not x.k[:, :, 1].float().any()


def test_quantize_refuses_bad_arguments() -> None:
    q, k, v = make_qkv(1, 32, 32, 2, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="granularity must be one of tensor, head"):
        quantize_fp8(q, k, v, "block")
    with pytest.raises(TypeError, match="quantize_fp8 takes float16, bfloat16 or float32"):
        quantize_fp8(q.to(torch.int32), k, v)
    with pytest.raises(ValueError, match="k and v must have one shape"):
        quantize_fp8(q, k, v[:, :16])


# -- arguments and configs -------------------------------------------------------------------------


def _small(device: str):
    """A small layout, its bf16 q, and those quantised."""
    layout = make_layout("hetero", 2, 2, 64, 32)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 32, torch.bfloat16, device)
    return layout, q, quantize_fp8(q, k, v)


def test_descales_may_be_one_per_batch_and_head_or_none(device) -> None:
    layout, _, x = _small(device)
    per_batch = _run(x._replace(q_descale=x.q_descale[None]), layout)
    torch.testing.assert_close(per_batch, _run(x, layout), rtol=0, atol=0)
    # None is a descale of 1: the kernel then attends over the raw e4m3 values.
    plain = sparse_attention_fp8(x.q, x.k, x.v_t, layout, sm_scale=1e-5)
    ref = reference_attention(x.q.float(), x.k.float(), x.v_t.float().permute(0, 3, 1, 2), layout,
                              sm_scale=1e-5)
    assert_verbose_close(plain, ref, rel_tol(FP8_DTYPE, device))


def test_a_batch_with_its_own_descales_per_sequence(device, poison_outputs) -> None:
    """Two sequences quantised apart (their values 1x and 8x): descales (batch, heads)."""
    layout = make_layout("hetero", 4, 2, 96, 32)
    q, k, v = make_qkv(2, 96, 96, 4, 2, 32, torch.bfloat16, device)
    q, k, v = (t * torch.tensor([1.0, 8.0], device=device, dtype=t.dtype).view(2, 1, 1, 1)
               for t in (q, k, v))
    parts = [quantize_fp8(q[b:b + 1], k[b:b + 1], v[b:b + 1]) for b in range(2)]
    x = Fp8Inputs(*(torch.cat([getattr(p, f) if f in ("q", "k", "v_t") else getattr(p, f)[None]
                               for p in parts]) for f in Fp8Inputs._fields))
    assert x.q_descale.shape == (2, 4) and x.v_t.shape == (2, 2, 32, 96)
    out = _run(x, layout, sm_scale=0.1)
    deq = [torch.cat(ts) for ts in zip(*(dequantize_fp8(p) for p in parts))]
    ref = reference_attention(*deq, layout, sm_scale=0.1)
    assert_verbose_close(out, ref, rel_tol(FP8_DTYPE, device))


def test_bad_calls_are_refused_before_launch(device) -> None:
    layout, q, x = _small(device)
    with pytest.raises(TypeError, match="takes torch.float8_e4m3fn"):
        sparse_attention_fp8(q, x.k, x.v_t, layout)
    with pytest.raises(ValueError, match=r"v_t must be \(batch, kv_heads, dim, seq_k\)"):
        sparse_attention_fp8(x.q, x.k, x.k, layout)
    with pytest.raises(ValueError, match="q_descale has shape"):
        _run(x._replace(q_descale=torch.ones(3, device=device)), layout)
    with pytest.raises(ValueError, match="invalid launch config m32n16w4s1"):
        _run(x, layout, config=LaunchConfig(32, 16, 4, 1))
    with pytest.raises(TypeError, match="out_dtype"):
        _run(x, layout, out_dtype=torch.int8)
    leaf = torch.zeros(1, 64, 2, 32, device=device, dtype=FP8_DTYPE).requires_grad_()
    with pytest.raises(NotImplementedError, match="train through sparse_attention_fp8_trainable"):
        sparse_attention_fp8(leaf, x.k, x.v_t, layout)


def test_config_rules() -> None:
    assert fp8_config_problems(LaunchConfig(64, 128, 4, 2), 64, 128) == []  # gathers 2 blocks
    assert fp8_config_problems(LaunchConfig(128, 32, 8, 3), 64, 128) == []  # sub-tiles
    assert fp8_config_problems(LaunchConfig(64, 16, 4, 2), 64, 128) == [
        "block_n=16 must be a power of two >= 32 (fp8 products take k >= 32)"]
    assert fp8_config_problems(LaunchConfig(64, 256, 4, 2), 16, 128) == [
        "block_n=256 gathers more than 8 sparse blocks of 16"]
    # The Gluon kernel's fixed shape: 128 rows, 64 or 128 keys, 4 warps a consumer group.
    for block_n in (64, 128):
        for stages in (2, 3, 4):
            config = LaunchConfig(128, block_n, 4, stages, "gluon")
            assert fp8_config_problems(config, 64, 128) == [], config
    assert fp8_config_problems(LaunchConfig(64, 128, 8, 5, "gluon"), 32, 80) == [
        "block_m=64 must be 128 for impl='gluon'",
        "num_warps=8 must be 4 for impl='gluon' (4 warps a consumer group)",
        "num_stages=5 must be 2, 3 or 4 for impl='gluon'",
        "impl='gluon' needs a sparse block size that is a multiple of 64 and divides or is a "
        "multiple of 128, got 32",
        "impl='gluon' needs head_dim 64 or 128, got 80"]
    assert fp8_config_problems(LaunchConfig(128, 32, 4, 2, "gluon"), 64, 128) == [
        "block_n=32 must be 64 or 128 for impl='gluon'"]


def test_the_general_config_rules_and_default_take_the_fp8_kernels_own() -> None:
    """What the tuner, `dkbench cache import` and the shipped-file check ask of every kernel:
    for "fp8" the fp8 forward's answers, not the 16-bit forward's (which would refuse its
    128-key steps over 64-key blocks)."""
    for config in (LaunchConfig(64, 128, 4, 2), LaunchConfig(64, 16, 4, 2),
                   LaunchConfig(128, 32, 4, 2, "gluon"), LaunchConfig(128, 128, 4, 3, "gluon")):
        assert (kernels.config_problems(config, 64, 128, "fp8")
                == fp8_config_problems(config, 64, 128)), config
    assert kernels.config_problems(LaunchConfig(64, 128, 4, 2), 64, 128, "fwd") != []
    cpu = torch.device("cpu")
    assert (kernels.default_config("fp8", cpu, 64, 128, FP8_DTYPE)
            == fp8_default_config(cpu, 64, 128))
    assert "implementations are 'triton' and 'gluon'" in " ".join(
        fp8_config_problems(LaunchConfig(128, 128, 4, 3, "fused"), 64, 128))
    for device in ("cpu", "cuda"):
        for block_size, head_dim in ((16, 32), (64, 128), (128, 256)):
            config = fp8_default_config(torch.device(device), block_size, head_dim)
            assert fp8_config_problems(config, block_size, head_dim) == [], (device, config)
    space = kernels.KERNELS["fp8"].search_space
    for values in itertools.product(*space.values()):
        config = LaunchConfig(*values)
        if config.impl == "triton" or (config.block_m, config.num_warps) == (128, 4):
            assert fp8_config_problems(config, 64, 128) == [], values


# Compiled in a fresh interpreter (the suite runs with TRITON_INTERPRET=1): the GPU path, with
# fp8 tensor-core products and neither spills nor 16-bit fallbacks, for Hopper.
_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import fp8

block_m, block_n, warps, tma = (int(x) for x in sys.argv[1:])
head_dim, block_size = 128, 64
fn = fp8._sparse_attn_fwd_fp8
constants = dict(stride_qk=1, stride_kk=1, stride_vn=1, stride_ok=1, BLOCK_M=block_m,
                 BLOCK_N=block_n, BLOCK_D=head_dim, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                 IS_CAUSAL=True, RETURN_LSE=True, EMULATE=False, USE_TMA=bool(tma))
boxes = {"KDesc": (block_n, head_dim), "VDesc": (head_dim, block_n)}

def kind(name):
    if name in constants:
        return "constexpr"
    if name in boxes:
        rows, cols = boxes[name]
        return f"tensordesc<fp8e4nv[1, 1, {rows}, {cols}]>" if tma else "*fp8e4nv"
    if name in ("Q", "K", "Vt"):
        return "*fp8e4nv"
    if name in ("Out", "Lse", "QDescale", "KDescale", "VDescale"):
        return "*bf16" if name == "Out" else "*fp32"
    if name[0].isupper():
        return "*i32"  # the tile plan
    return "fp32" if name == "qk_scale" else "i32"

names = fn.arg_names
sig = {name: kind(name) for name in names}
# What a phi-3 launch specialises on: 16-byte aligned pointers, and tensor strides and lengths
# divisible by 16 (the descales' strides are 0 or 1).
aligned = [i for i, name in enumerate(names) if sig[name].startswith("*")
           or (sig[name] == "i32" and name.startswith("stride") and name[-2] != "d")
           or name in ("seq_q", "seq_k")]
source = ASTSource(fn, sig, {(names.index(n),): v for n, v in constants.items()},
                   {(i,): [["tt.divisibility", 16]] for i in aligned})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=2))
ptx = compiled.asm["ptx"]
assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx, "no fp8 warp-group MMA"
assert "mma.sync" not in ptx, "a product fell back to mma.sync"
assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, "p is not cast to e4m3 rounding to nearest"
assert "ld.global.b8" not in ptx, "a tile is loaded one byte at a time"
assert ("cp.async.bulk.tensor" in ptx) == bool(tma), "wrong load path"
print("ok", len(compiled.asm["cubin"]))
"""


@pytest.mark.parametrize("block_m, block_n, warps, tma", [(64, 128, 4, 0), (64, 64, 4, 1)])
def test_fp8_kernel_compiles_for_hopper(block_m: int, block_n: int, warps: int, tma: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(block_m), str(block_n),
                           str(warps), str(tma)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]


def test_the_fp8_record_hashes_its_modules() -> None:
    record = kernels.KERNELS["fp8"]
    assert record.sources == ("kernels.fp8", "kernels.fp8_softmax", "kernels.fp8_ws",
                              "kernels.fwd_ws", "kernels.fwd_tile", "kernels.common",
                              "kernels.schedule", "kernels.ws_mma")
    assert record.entry == "sparse_attention_fp8" and record.impls == ("triton", "gluon")
    assert all(name in kernels.__all__ for name in (
        "sparse_attention_fp8", "quantize_fp8", "dequantize_fp8", "resolve_fp8_config"))


@pytest.mark.parametrize("seq", [64, 100, 4096])
def test_mma_key_order_matches_the_kernels_p_columns(seq: int) -> None:
    """The Gluon fp8 kernel reads p's columns within each 32-key run in the order its
    ``_as_pv_operand`` reshapes them to, and vᵀ's keys as ``mma_key_order`` stores them: the
    product must be p v, with the padded keys zero."""
    from kernels import fp8_ws

    gen = torch.Generator().manual_seed(seq)
    # As quantize_fp8 writes it: the key axis padded in storage (its strides are not seq's).
    stored = torch.randn(2, 3, 16, seq + 16, generator=gen).to(FP8_DTYPE)
    v_t = stored[..., :seq]
    ordered = fp8_ws.mma_key_order(v_t)
    padded = -(-seq // 32) * 32
    assert ordered.shape == (2, 3, 16, padded) and ordered.dtype == FP8_DTYPE

    def reorder(x: torch.Tensor) -> torch.Tensor:  # _as_pv_operand's reshape and permute
        return x.reshape(*x.shape[:-1], -1, 2, 2, 4, 2).transpose(-2, -3).reshape(x.shape)

    key_at = reorder(torch.arange(padded))  # the key each position holds
    assert sorted(key_at.tolist()) == list(range(padded)) and key_at[1] == 1 and key_at[2] == 8
    v_padded = torch.cat([v_t.float(), torch.zeros(2, 3, 16, padded - seq)], dim=-1)
    assert torch.equal(ordered.float(), v_padded[..., key_at])  # padding keys read zero
    p = torch.randn(5, padded, generator=gen, dtype=torch.float64)
    p[:, seq:] = 0.0  # keys past the end are masked
    want = p[:, :seq] @ v_t.double().transpose(-1, -2)
    got = reorder(p) @ ordered.double().transpose(-1, -2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_fp8_configs_benchmark_times_valid_configs() -> None:
    """benchmarks/fp8_configs.py (GPU only) imports what it uses, and every Gluon config it
    times runs the Gluon kernel at phi-3's block size and head_dim."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fp8_configs.py"
    spec = importlib.util.spec_from_file_location("fp8_configs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.GLUON and all(fp8_config_problems(c, 64, 128) == [] and c.impl == "gluon"
                                for c in module.GLUON.values())


@pytest.mark.parametrize("keys", [64, 128])
def test_ones_tile_the_row_sums_take(keys: int) -> None:
    """The Gluon fp8 kernel's row sums are p times this tile: it must be e4m3 ones, (1, 1, 8,
    keys) as its descriptor boxes it, made once per device and width."""
    from kernels import fp8_ws

    tile = fp8_ws._ones_tile(torch.device("cpu"), keys)
    assert tile.shape == (1, 1, 8, keys) and tile.dtype == FP8_DTYPE and tile.is_contiguous()
    assert torch.equal(tile.float(), torch.ones(1, 1, 8, keys))
    assert fp8_ws._ones_tile(torch.device("cpu"), keys) is tile
    assert fp8_ws._ones_tile(torch.device("cpu"), 192 - keys) is not tile
