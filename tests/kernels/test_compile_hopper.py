"""Every kernel family compiles for Hopper (sm_90a) with the installed triton, on any machine.

The interpreter runs the kernels' arithmetic but never NVIDIA's code generator, so a triton
release that cannot build the Gluon forward, a tensor-memory copy or an fp8 product would pass
every other CPU test. `benchmarks/compile_check.py` compiles each family through its launcher,
for a Hopper GPU that is not there; this runs it in a process of its own (the kernels must be
decorated without TRITON_INTERPRET).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Each family's kernels, in launch order: the backward launches dq before dk/dv, the fused
# backward a pre-pass and the dk/dv kernel with atomics.
EXPECTED = [
    ("fwd (triton)", "_sparse_attn_fwd"),
    ("fwd (gluon)", "_sparse_attn_fwd_ws"),
    ("fwd (gluon, owned steps)", "_sparse_attn_fwd_halves"),
    ("bwd (dq, dk/dv)", "_bwd_dq"),
    ("bwd (dq, dk/dv)", "_bwd_dkdv"),
    ("bwd (dq, gluon)", "_bwd_dq_ws"),
    ("bwd (dq, gluon, owned steps)", "_bwd_dq_halves"),
    ("bwd (dk/dv, gluon)", "_bwd_dkdv_ws"),
    ("bwd (fused)", "_bwd_fused_prep"),
    ("bwd (fused)", "_bwd_dkdv"),
    ("bwd (fused, gluon)", "_bwd_fused_prep"),
    ("bwd (fused, gluon)", "_bwd_fused_ws"),
    ("fwd (fp8)", "_sparse_attn_fwd_fp8"),
    ("fwd (fp8, gluon)", "_mma_key_order_copy"),
    ("fwd (fp8, gluon)", "_sparse_attn_fwd_fp8_ws"),
    ("bwd (fp8)", "_fp8_do_prepass"),
    ("bwd (fp8)", "_fp8_bwd_dq"),
    ("bwd (fp8)", "_fp8_bwd_dkdv"),
    ("bwd (fp8)", "_fp8_dequantise"),
    # its "gluon" form: q, k and v copied, the 16-bit dq kernel, dOᵀ reordered, dk/dv in Gluon
    ("bwd (fp8, gluon)", "_fp8_dequantise"),
    ("bwd (fp8, gluon)", "_fp8_dequantise"),
    ("bwd (fp8, gluon)", "_fp8_dequantise"),
    ("bwd (fp8, gluon)", "_bwd_dq"),
    ("bwd (fp8, gluon)", "_fp8_do_prepass"),
    ("bwd (fp8, gluon)", "_fp8_bwd_dkdv_ws"),
    ("decode", "_decode_split"),
    ("varlen", "_sparse_attn_fwd_varlen"),
]
# The warp-specialised Gluon kernels' names end so (on owned steps: kernels/halves_plan.py).
GLUON_SUFFIXES = ("_ws", "_halves")


def test_every_kernel_family_compiles_for_hopper(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compiled here, not found
    done = subprocess.run([sys.executable, "benchmarks/compile_check.py", "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = {f["family"]: f["error"] for f in found if "error" in f}
    assert not failed, failed
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(f["family"], f["kernel"]) for f in found] == EXPECTED
    for gluon in (f for f in found if f["kernel"].endswith(GLUON_SUFFIXES)):
        # Three warp groups (two consumers, or one consumer of two groups, and the loaders'
        # padded to a group) within the budget the kernel sets itself, so 12 warps fit one
        # SM's registers.
        assert gluon["num_warps"] == 12
        if gluon["registers"] is not None:  # None: this triton came without cuobjdump
            from kernels.fwd_ws import MAX_REGS
            assert gluon["registers"] <= MAX_REGS
    assert all(0 < f["shared_bytes"] <= 232448 for f in found)  # what a Hopper block may take
    # The shipped forwards (the owned-step one too) and the Gluon dq kernel spill nothing on
    # triton 3.6 to 3.9 (kernels/PERF.md): a spill there would cost time in every step, so a
    # change that makes one is worth a look on the GPU. (The dq kernel on owned steps spills
    # 48 B on 3.6 and 3.9, measured with it.)
    for name in ("_sparse_attn_fwd_ws", "_sparse_attn_fwd_fp8", "_sparse_attn_fwd_fp8_ws",
                 "_bwd_dq_ws", "_sparse_attn_fwd_halves"):
        (kernel,) = [f for f in found if f["kernel"] == name]
        assert kernel["stack_bytes"] in (0, None), kernel
    # ptxas serialises no Gluon kernel's products nor the Triton fp8 forward's on triton 3.6 or
    # 3.9 (a product left in flight across a loop's back edge makes it wait for each one as it
    # is issued: kernels/PERF.md, H200 session 14), which would undo the kernels' pipelining.
    for kernel in found:
        if kernel["kernel"].endswith(GLUON_SUFFIXES) or kernel["kernel"] == "_sparse_attn_fwd_fp8":
            assert kernel["wgmma_serialised"] in (False, None), kernel


def test_the_check_reads_why_ptxas_serialises_wgmma() -> None:
    """The message ptxas (sm_90a, -v) printed for a kernel with a product in flight across its
    loop's back edge, and the log of one without."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compile_check import serialisation_reason

    log = ("ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are "
           "serialized due to non wgmma instructions reading accumulator registers of  a wgmma "
           "between start and end of the pipeline stage in the function '_kernel'\n"
           "ptxas info    : Used 168 registers, used 3 barriers\n")
    assert serialisation_reason(log) == ("non wgmma instructions reading accumulator registers "
                                         "of a wgmma between start and end of the pipeline stage")
    assert serialisation_reason(log.splitlines()[1]) is None


def test_the_check_refuses_to_run_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "benchmarks/compile_check.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unset TRITON_INTERPRET" in done.stderr
