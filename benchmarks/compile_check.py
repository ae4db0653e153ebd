"""Compile every GPU kernel family for Hopper (sm_90a) on a machine without a GPU.

The CPU interpreter runs the Triton kernels' arithmetic, never the NVIDIA code generator: the
Gluon forward, tensor-memory copies and the fp8 products only ever compile on a GPU. This
compiles them here, with the installed triton, through the same launchers a GPU call takes, at
each kernel's default config for Hopper, so a triton version that cannot build one is seen on any
machine, and ptxas says what each costs (registers, spills, shared memory).

How: triton's active driver is replaced by one that reports an sm_90 device and launches nothing,
and `JITFunction.run` compiles for that target instead of launching (the launchers' outputs are
left unwritten). The launchers see CPU tensors, so the few questions they put to torch.cuda
(compute capability, SM count) are answered for an H100, and the tensors say they are on a GPU,
so tensor descriptors and the Gluon kernel are chosen as on one. Run it without TRITON_INTERPRET:

    python benchmarks/compile_check.py            # a table
    python benchmarks/compile_check.py --json     # one JSON object per compiled kernel

Exit status 1 when a kernel family fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CAPABILITY = (9, 0)
SMS = 132  # an H100 SXM's; H200 has as many
MAX_SHARED = 232448  # bytes of shared memory a block may take on Hopper (227 KB)
CUDA = torch.device("cuda")


@dataclass
class Compiled:
    family: str
    kernel: str
    registers: int | None
    stack_bytes: int | None  # stack frame per thread: where ptxas puts what it spills
    shared_bytes: int
    num_warps: int
    # Whether ptxas serialises the kernel's wgmma products (each waited for as it is issued,
    # which costs a pipelined kernel most of its overlap), and its reason; None: no ptxas here.
    wgmma_serialised: bool | None = None
    serialisation: str = ""


class _NoLaunch:
    """What the fake driver gives as a kernel's launcher: it launches nothing."""

    def __init__(self, src, metadata) -> None:
        pass

    def __call__(self, *args, **kwargs) -> None:
        return None


class _Utils:
    @staticmethod
    def get_device_properties(device) -> dict:
        return {"max_shared_mem": MAX_SHARED, "multiprocessor_count": SMS,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1980000,
                "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    @staticmethod
    def load_binary(name, kernel, shared, device):
        registers, stack = resource_usage(kernel)
        return object(), object(), registers or 0, stack or 0, 1024


class HopperWithoutGpu:
    """A triton driver for an sm_90 device that is not there."""

    utils = _Utils()
    launcher_cls = _NoLaunch

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", CAPABILITY[0] * 10 + CAPABILITY[1], 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return CAPABILITY

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("nothing can be timed without a GPU")

    @staticmethod
    def is_active() -> bool:
        return True


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) of a cubin's kernel, from cuobjdump; None where the tool is
    missing or its output has no such field."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return (int(regs.group(1)) if regs else None, int(stack.group(1)) if stack else None)


_SERIALISED = re.compile(r"wgmma\.mma_async instructions are serialized due to (.*?)(?: in the"
                         r" function|$)", re.MULTILINE)


def wgmma_serialisation(ptx: str) -> tuple[bool | None, str]:
    """Whether ptxas (sm_90a) serialises the wgmma products of ``ptx``, and why, as its
    verbose output says (message C7514 and its kin); (None, "") where ptxas is missing."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not tool.exists():
        return None, ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(tool), "-v", "--gpu-name=sm_90a", str(src), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    why = serialisation_reason(done.stdout + done.stderr)
    return why is not None, why or ""


def serialisation_reason(ptxas_log: str) -> str | None:
    """The reason ptxas's verbose log gives for serialising wgmma products; None: it does not."""
    found = _SERIALISED.search(ptxas_log)
    return " ".join(found.group(1).split()) if found else None


@contextmanager
def hopper_without_gpu(record: Callable[[object], None]) -> Iterator[None]:
    """Within the block, kernel launches compile for sm_90 and hand the compiled kernel to
    ``record`` instead of running."""
    from triton.runtime.driver import driver as active
    from triton.runtime.jit import JITFunction

    import kernels.fwd_ws

    fake = HopperWithoutGpu()
    saved_driver = active._active
    saved = (JITFunction.run, torch.cuda.get_device_capability,
             torch.cuda.get_device_properties, kernels.fwd_ws._sm_count)
    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        kernel._init_handles()  # ptxas' resource figures come with loading
        record(kernel)

    active.set_active(fake)
    JITFunction.run = run
    torch.cuda.get_device_capability = lambda device=None: CAPABILITY
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(
        multi_processor_count=SMS, name="compile check (sm_90, no GPU)")
    kernels.fwd_ws._sm_count = lambda device: SMS
    # The launchers ask a tensor whether it is on a GPU to choose tensor-memory copies and the
    # Gluon kernel; `interpreting()` stays False, so no emulated variant is compiled.
    torch.Tensor.is_cuda = property(lambda self: True)
    try:
        yield
    finally:
        del torch.Tensor.is_cuda
        (JITFunction.run, torch.cuda.get_device_capability, torch.cuda.get_device_properties,
         kernels.fwd_ws._sm_count) = saved
        active.set_active(saved_driver)  # None: made again on first use, as before


# -- the kernel families, each through its launcher --------------------------------------------

BATCH, HEADS, KV_HEADS, SEQ, DIM, BLOCK = 2, 8, 2, 1024, 128, 64


def _layout():
    import kernels

    return kernels.local_stride_layout(HEADS, SEQ, BLOCK, 4, 4, num_kv_heads=KV_HEADS,
                                       head_sliding_offset=1)


def _bhsd(heads: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A ``(batch, heads, seq, dim)`` view of a ``(batch, seq, heads, dim)`` tensor."""
    return torch.randn(BATCH, SEQ, heads, DIM).to(dtype).transpose(1, 2)


def _config(kernel: str):
    """The kernel's default Triton config on a Hopper GPU."""
    from kernels.configs import default_config

    return default_config(kernel, CUDA, BLOCK, DIM, torch.bfloat16, allow_gluon=False)


def forward_triton() -> None:
    from kernels import fwd

    fwd.sparse_attention_fwd(_bhsd(HEADS), _bhsd(KV_HEADS), _bhsd(KV_HEADS), _layout(), 0.088,
                             _config("fwd"))


def forward_gluon() -> None:
    from kernels import fwd_ws
    from kernels.configs import GLUON_DEFAULT as config

    fwd_ws.sparse_attention_fwd_ws(_bhsd(HEADS), _bhsd(KV_HEADS), _bhsd(KV_HEADS), _layout(),
                                   0.088, stages=config.num_stages,
                                   boxes=config.block_n // fwd_ws.BOX_N)


def forward_gluon_halves() -> None:
    """The Gluon forward with owned steps, on a random pattern (its halves keep different
    blocks)."""
    import kernels
    from kernels import fwd_halves

    layout = kernels.random_layout(HEADS, SEQ // BLOCK, BLOCK, 0.3)
    fwd_halves.sparse_attention_fwd_halves(_bhsd(HEADS), _bhsd(KV_HEADS), _bhsd(KV_HEADS),
                                           layout, 0.088, stages=3)


def _backward_inputs() -> tuple[torch.Tensor, ...]:
    """q, k, v, out, dO, lse and delta of one backward call (values unused: nothing runs)."""
    q, k, v, out, do = (_bhsd(HEADS), _bhsd(KV_HEADS), _bhsd(KV_HEADS), _bhsd(HEADS),
                        _bhsd(HEADS))
    return q, k, v, out, do, torch.zeros(BATCH, HEADS, SEQ), torch.zeros(BATCH, HEADS, SEQ)


def backward() -> None:
    from kernels import bwd

    q, k, v, out, do, lse, _ = _backward_inputs()
    bwd.sparse_attention_bwd(do, q, k, v, out, lse, _layout(), 0.088, _config("bwd"),
                             _config("dq"))


def backward_dq_gluon() -> None:
    from kernels import bwd_dq_ws
    from kernels.configs import GLUON_DQ_DEFAULT as config

    q, k, v, out, do, lse, delta = _backward_inputs()
    bwd_dq_ws.sparse_attention_dq_ws(do, q, k, v, out, lse, delta, torch.empty_like(q), _layout(),
                                     0.088, stages=config.num_stages,
                                     boxes=config.block_n // bwd_dq_ws.BOX_N)


def backward_dq_gluon_halves() -> None:
    """The Gluon dq kernel on owned steps, on a random pattern, at the dq default's steps."""
    import kernels
    from kernels import bwd_dq_halves
    from kernels.configs import GLUON_DQ_DEFAULT as config

    q, k, v, out, do, lse, delta = _backward_inputs()
    bwd_dq_halves.sparse_attention_dq_halves(
        do, q, k, v, out, lse, delta, torch.empty_like(q),
        kernels.random_layout(HEADS, SEQ // BLOCK, BLOCK, 0.3), 0.088,
        stages=config.num_stages, boxes=config.block_n // BLOCK)


def backward_dkdv_gluon() -> None:
    from kernels import bwd_dkdv_ws
    from kernels.columns import column_plan
    from kernels.configs import GLUON_BWD_DEFAULT as config

    q, k, v, _, do, lse, delta = _backward_inputs()
    layout = _layout()
    bwd_dkdv_ws.sparse_attention_dkdv_ws(do, q, k, v, lse, delta, torch.empty_like(k),
                                         torch.empty_like(v), layout,
                                         column_plan(layout, SEQ, SEQ), 0.088,
                                         stages=config.num_stages)


def backward_fused() -> None:
    from kernels import bwd_fused

    q, k, v, out, do, lse, _ = _backward_inputs()
    bwd_fused.sparse_attention_bwd_fused(do, q, k, v, out, lse, _layout(), 0.088,
                                         _config("bwd"))


def backward_fused_gluon() -> None:
    from kernels import bwd_fused_ws

    q, k, v, out, do, lse, _ = _backward_inputs()
    bwd_fused_ws.sparse_attention_bwd_fused_ws(do, q, k, v, out, lse, _layout(), 0.088)


def _fp8_inputs() -> tuple:
    """e4m3 q, k and v_t of one fp8 call, with descales of 1 (values unused: nothing runs)."""
    e4m3 = torch.float8_e4m3fn
    q, k = _bhsd(HEADS, e4m3), _bhsd(KV_HEADS, e4m3)
    v_t = torch.randn(BATCH, KV_HEADS, DIM, SEQ).to(e4m3)
    descales = (torch.ones(BATCH, HEADS), torch.ones(BATCH, KV_HEADS),
                torch.ones(BATCH, KV_HEADS))
    return q, k, v_t, descales


def _forward_fp8(gluon: bool) -> None:
    """The fp8 forward at the Triton kernel's default (torch sees no GPU here, so that is what
    fp8_default_config gives) or the Gluon kernel's."""
    from kernels import fp8

    q, k, v_t, descales = _fp8_inputs()
    config = fp8.GLUON_FP8_DEFAULT if gluon else fp8.fp8_default_config(CUDA, BLOCK, DIM)
    fp8.sparse_attention_fp8_fwd(q, k, v_t, _layout(), descales, 0.088, config)


def forward_fp8() -> None:
    _forward_fp8(gluon=False)


def forward_fp8_gluon() -> None:
    _forward_fp8(gluon=True)


def backward_fp8() -> None:
    """The fp8 backward's pre-pass, dq and dk/dv kernels at their Hopper defaults, and the
    dequantising copy its "bf16" form takes."""
    from kernels import fp8_bwd

    q, k, v_t, descales = _fp8_inputs()
    _, _, _, out, do, lse, _ = _backward_inputs()
    fp8_bwd.sparse_attention_fp8_bwd_views(do, q, k, v_t, out, lse, _layout(), descales, 0.088,
                                           fp8_bwd.fp8_bwd_default_configs(CUDA, DIM))
    # The "bf16" form's copies of the dequantised inputs (then the 16-bit backward's kernels).
    fp8_bwd.dequantised_bf16(q, descales[0])


def backward_fp8_gluon() -> None:
    """The fp8 backward's "gluon" form: its copies, the 16-bit dq kernel, the reordering
    pre-pass and the Gluon fp8 dk/dv kernel."""
    from kernels import fp8_bwd_ws

    q, k, v_t, descales = _fp8_inputs()
    _, _, _, out, do, lse, _ = _backward_inputs()
    fp8_bwd_ws.gluon_gradients(do, q, k, v_t, out, lse, _layout(), descales, 0.088)


def decode() -> None:
    from kernels import decode as dec

    batch, cache_len = 2, SEQ
    q = torch.randn(batch, HEADS, DIM).to(torch.bfloat16)
    k_cache = torch.randn(batch, cache_len, KV_HEADS, DIM).to(torch.bfloat16)
    v_cache = torch.randn(batch, cache_len, KV_HEADS, DIM).to(torch.bfloat16)
    lens = torch.full((batch,), cache_len, dtype=torch.int32)
    dec.sparse_attention_decode_fwd(q, k_cache, v_cache, lens, _layout(), 0.088, None,
                                    _config("decode"))


def varlen() -> None:
    from kernels import varlen as vl
    from kernels.inference import varlen_sequences

    lengths = torch.tensor([0, SEQ // 2, SEQ], dtype=torch.int32)
    seqs = varlen_sequences(lengths, lengths)
    q = torch.randn(1, SEQ, HEADS, DIM).to(torch.bfloat16)
    k, v = (torch.randn(1, SEQ, KV_HEADS, DIM).to(torch.bfloat16) for _ in range(2))
    vl.sparse_attention_fwd_varlen(q, k, v, seqs, _layout(), 0.088, _config("varlen"),
                                   torch.empty_like(q))


FAMILIES: dict[str, Callable[[], None]] = {
    "fwd (triton)": forward_triton,
    "fwd (gluon)": forward_gluon,
    "fwd (gluon, owned steps)": forward_gluon_halves,
    "bwd (dq, dk/dv)": backward,
    "bwd (dq, gluon)": backward_dq_gluon,
    "bwd (dq, gluon, owned steps)": backward_dq_gluon_halves,
    "bwd (dk/dv, gluon)": backward_dkdv_gluon,
    "bwd (fused)": backward_fused,
    "bwd (fused, gluon)": backward_fused_gluon,
    "fwd (fp8)": forward_fp8,
    "fwd (fp8, gluon)": forward_fp8_gluon,
    "bwd (fp8)": backward_fp8,
    "bwd (fp8, gluon)": backward_fp8_gluon,
    "decode": decode,
    "varlen": varlen,
}


def compile_all() -> tuple[list[Compiled], dict[str, str]]:
    """Every family's kernels compiled, and the families that failed with why."""
    compiled: list[Compiled] = []
    failed: dict[str, str] = {}
    for family, launch in FAMILIES.items():
        def record(kernel, family: str = family) -> None:
            serialised, why = wgmma_serialisation(kernel.asm["ptx"])
            compiled.append(Compiled(family, kernel.name, kernel.n_regs or None,
                                     kernel.n_spills, kernel.metadata.shared,
                                     kernel.metadata.num_warps, serialised, why))
        before = len(compiled)
        try:
            with hopper_without_gpu(record):
                launch()
        except Exception as exc:  # noqa: BLE001 - one family failing never hides the others
            lines = traceback.format_exception_only(type(exc), exc)
            failed[family] = " ".join(" ".join(lines).split())[:2000]
            continue
        if len(compiled) == before:
            failed[family] = "its launcher launched no kernel"
    return compiled, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    import triton

    compiled, failed = compile_all()
    if args.json:
        for c in compiled:
            print(json.dumps(asdict(c)))
        for family, why in failed.items():
            print(json.dumps({"family": family, "error": why}))
    else:
        print(f"triton {triton.__version__}, target sm_{CAPABILITY[0]}{CAPABILITY[1]}a")
        for c in compiled:
            print(f"  {c.family:<16} {c.kernel:<24} {c.num_warps:>2} warps  "
                  f"{c.registers} registers  {c.stack_bytes} B stack  {c.shared_bytes} B shared"
                  + (f"  wgmma serialised: {c.serialisation}" if c.wgmma_serialised else ""))
        for family, why in failed.items():
            print(f"  {family:<16} FAILED: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skips triton's bindings reporting their objects leaked at shutdown
