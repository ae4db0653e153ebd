"""The Gluon kernels' config rules, dispatch and fallback, and that the forward compiles for Hopper.

Gluon kernels do not run in Triton's interpreter: on the CPU the dispatch falls back to the
Triton kernel (checked against the reference here), and the Gluon kernel is compiled for sm_90a
without a GPU, which catches a triton release that changed the Gluon API. Its numbers are
checked on the GPU in test_gpu_gluon.py (the backward's in test_gpu_bwd_gluon.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from kernels import (
    LaunchConfig,
    bwd_dkdv_ws,
    bwd_dq_ws,
    fwd_ws,
    reference_attention,
    sparse_attention,
)
from kernels.dispatch import choose_impl
from kernels.config_cache import FORMAT_VERSION, ConfigCacheWarning, load_shipped
from kernels.configs import config_problems, default_config
from kernels.inference import sparse_attention_varlen
from tests.kernels.cases import make_layout, make_qkv
from tests.tolerances import assert_verbose_close

GLUON = LaunchConfig(128, 128, 4, 3, "gluon")


def test_gluon_config_rules() -> None:
    assert config_problems(GLUON, 64, 128) == []
    assert config_problems(LaunchConfig(128, 64, 4, 2, "gluon"), 128, 64) == []
    assert GLUON.short() == "gluon-m128n128w4s3"
    assert LaunchConfig(128, 64).short() == "m128n64w4s2"
    problems = " ".join(config_problems(LaunchConfig(64, 96, 8, 5, "gluon"), 32, 80, "varlen"))
    for text in ("runs the fwd, bwd, dq, fp8 kernels only", "block_m=64", "block_n=96",
                 "num_warps=8", "num_stages=5", "multiple of 64", "head_dim 64 or 128"):
        assert text in problems
    assert "impl='cuda' must be one of triton, gluon" in config_problems(
        LaunchConfig(64, 64, 4, 2, "cuda"), 64, 64)[0]


def test_gluon_backward_config_rules() -> None:
    # dk/dv: a 64-key kv tile, 64-row query steps, 2 or 3 stages (4 would not fit at d128).
    assert config_problems(LaunchConfig(64, 64, 4, 2, "gluon"), 64, 128, "bwd") == []
    assert config_problems(LaunchConfig(64, 64, 4, 3, "gluon"), 128, 64, "bwd") == []
    problems = " ".join(config_problems(LaunchConfig(128, 32, 4, 4, "gluon"), 64, 128, "bwd"))
    for text in ("block_m=128 must be 64", "block_n=32 must be 64", "num_stages=4 must be 2 or 3"):
        assert text in problems
    assert config_problems(LaunchConfig(64, 64, 4, 3, "gluon"), 64, 128, "bwd") == [
        "the Gluon bwd kernel at gluon-m64n64w4s3 and head_dim 128 needs 266240 bytes of shared "
        "memory, over a Hopper program's 232448"]
    # dq: the forward's tiles, with its q and dO tiles and the stages in shared memory.
    assert config_problems(LaunchConfig(128, 64, 4, 4, "gluon"), 64, 128, "dq") == []
    assert config_problems(LaunchConfig(128, 128, 4, 2, "gluon"), 64, 128, "dq") == []
    assert "needs 263168 bytes" in config_problems(LaunchConfig(128, 128, 4, 3, "gluon"), 64,
                                                   128, "dq")[0]
    assert config_problems(LaunchConfig(128, 128, 4, 4, "gluon"), 64, 64, "dq") == []


def test_configs_round_trip_and_old_entries_are_triton() -> None:
    assert LaunchConfig.from_dict(GLUON.as_dict()) == GLUON
    old = {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
    assert LaunchConfig.from_dict(old).impl == "triton"


def test_cache_entry_with_an_unknown_impl_is_rejected(tmp_path) -> None:
    key = {"gpu": "g", "capability": "9.0", "triton": triton.__version__, "kernel": "fwd",
           "kernel_hash": "0", "dtype": "bfloat16", "head_dim": 128, "block_size": 64,
           "seqlen_bucket": 8192, "density_bucket": 0.25}
    entry = {"key": key, "config": {**GLUON.as_dict(), "impl": "cutlass"}, "ms": 1.0,
             "default_ms": 1.0}
    path = tmp_path / "shipped.json"
    path.write_text(json.dumps({"format": FORMAT_VERSION, "entries": {"k": entry}}))
    with pytest.warns(ConfigCacheWarning, match="impl"):
        assert load_shipped(path) == {}


def test_cpu_default_is_triton_and_the_gluon_kernel_is_not_eligible() -> None:
    layout = make_layout("hetero", 4, 2, 256, 64)
    q, k, v = make_qkv(1, 256, 256, 4, 2, 64, torch.bfloat16, "cpu", seq_dim=2)
    assert not fwd_ws.eligible(q, k, v, layout)
    assert default_config("fwd", torch.device("cpu"), 64, 128, torch.bfloat16).impl == "triton"


def test_gluon_config_falls_back_to_triton_where_it_cannot_run(monkeypatch) -> None:
    """On the CPU (and on any call the Gluon kernel cannot take) the Triton kernel answers."""
    called = []
    monkeypatch.setattr(fwd_ws, "sparse_attention_fwd_ws", lambda *a, **k: called.append(1))
    layout = make_layout("hetero", 2, 1, 200, 64)
    q, k, v = make_qkv(1, 200, 200, 2, 1, 64, torch.float32, "cpu")
    out = sparse_attention(q, k, v, layout, config=LaunchConfig(128, 128, 4, 2, "gluon"))
    assert_verbose_close(out, reference_attention(q, k, v, layout), 2e-3)
    assert not called


def test_gluon_backward_configs_fall_back_to_triton_where_they_cannot_run(monkeypatch) -> None:
    """The backward's Gluon configs on the CPU: the Triton dq and dk/dv kernels answer, with
    their own defaults (the Gluon tiles would not fit them), and the gradients are right."""
    called = []
    for module, name in ((bwd_dq_ws, "sparse_attention_dq_ws"),
                         (bwd_dkdv_ws, "sparse_attention_dkdv_ws")):
        monkeypatch.setattr(module, name, lambda *a, **k: called.append(name))
    layout = make_layout("hetero", 2, 1, 200, 64)
    q, k, v = make_qkv(1, 200, 200, 2, 1, 64, torch.float32, "cpu", requires_grad=True)
    out = sparse_attention(q, k, v, layout, bwd_config=LaunchConfig(64, 64, 4, 2, "gluon"),
                           dq_config=LaunchConfig(128, 64, 4, 4, "gluon"))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference_attention(q, k, v, layout, grad=True)
    for name, got, want in zip(("dq", "dk", "dv"), grads,
                               torch.autograd.grad(ref, (q, k, v), dout)):
        assert_verbose_close(got, want, 2e-3, name)
    assert not called
    for kernel in ("bwd", "dq"):
        choice = choose_impl(kernel, "gluon", torch.device("cpu"), torch.float32)
        assert choice.impl == "triton" and "Hopper" in choice.reason, choice


def test_varlen_refuses_an_explicit_gluon_config() -> None:
    layout = make_layout("hetero", 2, 1, 128, 64)
    q = torch.randn(128, 2, 64)
    k = v = torch.randn(128, 1, 64)
    cu = torch.tensor([0, 128])
    with pytest.raises(ValueError, match="impl='triton'"):
        sparse_attention_varlen(q, k, v, cu, cu, layout, config=GLUON)


# Compiled in a fresh interpreter: the suite runs with TRITON_INTERPRET=1, under which Gluon
# kernels cannot be compiled.
_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from kernels import fwd_ws

boxes, head_dim, block_size = (int(x) for x in sys.argv[1:])
tma_store = boxes == 2  # as sparse_attention_fwd_ws decides for its own output

def desc(rows, cols):
    layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, cols], gl.bfloat16)
    return f"tensordesc<bf16[1, 1, {rows}, {cols}],{layout!r}>"

signature = dict(
    q_desc=desc(fwd_ws.BLOCK_M, head_dim), k_desc=desc(fwd_ws.BOX_N, 64),
    v_desc=desc(fwd_ws.BOX_N, 64), o_desc=desc(fwd_ws.BOX_N, 64), Out="*bf16", Lse="*fp32", Items="*i32", Starts="*i32",
    KvBlock="*i32", RowBits="*i32", stride_oz="i32", stride_oh="i32", stride_om="i32",
    stride_ok="i32", num_heads="i32", q_per_kv="i32", seq_q="i32", seq_k="i32", n_tiles="i32",
    first_tile="i32", qk_scale="fp32")
constants = dict(BLOCK_M=fwd_ws.BLOCK_M, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                 IS_CAUSAL=True, RETURN_LSE=True, BOXES=boxes, STAGES=2, TMA_STORE=tma_store)
signature.update({name: "constexpr" for name in constants})
names = list(signature)
source = GluonASTSource(fwd_ws._sparse_attn_fwd_ws, signature,
                        {(names.index(n),): value for n, value in constants.items()})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, maxnreg=fwd_ws.MAX_REGS))
ptx = compiled.asm["ptx"]
assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx, "no warp-group MMA or register split"
# The output leaves through tensor-memory stores exactly when the config has two boxes a step.
assert ("cp.async.bulk.tensor.4d.global.shared" in ptx) == tma_store, "wrong output path"
print("ok", len(compiled.asm["cubin"]))
"""


@pytest.mark.skipif(not fwd_ws.GLUON, reason="this triton has no Gluon")
@pytest.mark.parametrize("boxes, head_dim, block_size", [(2, 128, 64), (1, 64, 128)])
def test_gluon_kernel_compiles_for_hopper(boxes: int, head_dim: int, block_size: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(boxes), str(head_dim),
                           str(block_size)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
