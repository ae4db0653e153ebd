"""Interleaved A/B of versions of the fp8 Gluon forward (`kernels/fp8_ws.py`), on a GPU.

Each variant is a copy of the module (from a git revision, a file, or the working tree) with a
launch shape, imported beside the others in one process; each round times every variant once
with `triton.testing.do_bench`, and a variant's figure is the median of its per-round ratios to
the first variant's time (above 1 is faster). phi-3's shapes: 65,536 tokens a batch, 32/8 heads,
head_dim 128, block 64, sm_scale 1/128, e4m3 per head. Up to 16k tokens each variant's batch-0
output and natural-log LSE are also checked against the float32 reference of the dequantised
inputs (relative error of the output, largest LSE difference).

    python benchmarks/ab_fp8_forward.py VARIANT [VARIANT ...] [--seqlens 8192,65536]
        [--rounds 5] [--out FILE]

A VARIANT is NAME=SOURCE,BOXES,STAGES: SOURCE a git revision (`HEAD`, `HEAD~2`, a sha), a path
to a copy of the module, or `tree` (the working tree's); BOXES the 64-key copies a step (1 or
2), STAGES the kv tiles in flight. E.g. the committed kernel against the working tree's:

    python benchmarks/ab_fp8_forward.py head=HEAD,2,3 tree=tree,2,3 --out OUT/ab.json

Exit status 2 on a bad argument or without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODULE = "kernels/fp8_ws.py"
TOKENS, HEADS, KV_HEADS, DIM, SCALE = 65536, 32, 8, 128, 1 / 128
CHECKED_UP_TO = 16384  # the float32 reference's memory grows with the square of the length


@dataclass(frozen=True)
class Variant:
    name: str
    source: str
    boxes: int
    stages: int


def parse_variant(text: str) -> Variant:
    """``NAME=SOURCE,BOXES,STAGES`` as a :class:`Variant`; ValueError says what is wrong."""
    name, eq, rest = text.partition("=")
    parts = rest.split(",")
    if not eq or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or len(parts) != 3:
        raise ValueError(f"variant {text!r}: expected NAME=SOURCE,BOXES,STAGES "
                         "(e.g. head=HEAD,2,3)")
    source, boxes, stages = parts
    if boxes not in ("1", "2"):
        raise ValueError(f"variant {text!r}: BOXES must be 1 or 2, got {boxes!r}")
    if stages not in ("2", "3", "4"):
        raise ValueError(f"variant {text!r}: STAGES must be 2, 3 or 4, got {stages!r}")
    return Variant(name, source, int(boxes), int(stages))


def module_source(source: str) -> str:
    """The text of the module a variant names: the working tree's, a file's, or a revision's."""
    if source == "tree":
        return (ROOT / MODULE).read_text()
    if Path(source).is_file():
        return Path(source).read_text()
    try:
        done = subprocess.run(["git", "show", f"{source}:{MODULE}"], cwd=ROOT,
                              capture_output=True, text=True)
    except FileNotFoundError:
        raise ValueError(f"source {source!r} is neither a file nor 'tree', and git, which "
                         "would read a revision, is not installed") from None
    if done.returncode != 0:
        raise ValueError(f"source {source!r} is neither a file, 'tree', nor a git revision "
                         f"with {MODULE}: {done.stderr.strip()}")
    return done.stdout


def absolute_imports(text: str) -> str:
    """The module's relative imports (``from .x import``, ``from . import``) made absolute, so
    a copy outside the package imports the package's other modules."""
    text = re.sub(r"^(\s*)from \.(\w+) import", r"\1from kernels.\2 import", text, flags=re.M)
    return re.sub(r"^(\s*)from \. import", r"\1from kernels import", text, flags=re.M)


def load_variant(variant: Variant, folder: Path) -> ModuleType:
    """A variant's module, written into ``folder`` (Triton reads a kernel's source from its
    file) and imported under a name of its own."""
    name = f"ab_fp8_ws_{variant.name.replace('-', '_').replace('.', '_')}"
    path = folder / f"{name}.py"
    path.write_text(absolute_imports(module_source(variant.source)))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _inputs(seq: int):
    import torch

    from kernels import local_stride_layout, quantize_fp8
    from kernels.fp8 import _expand_descale

    batch = TOKENS // seq
    layout = local_stride_layout(HEADS, seq, 64, 16, 8, head_sliding_offset=1)
    gen = torch.Generator(device="cuda").manual_seed(seq)
    q, k, v = (torch.randn(batch, seq, h, DIM, device="cuda", dtype=torch.bfloat16,
                           generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))
    x = quantize_fp8(q, k, v)
    descales = tuple(_expand_descale(n, d, batch, h, q.device) for n, d, h in (
        ("q_descale", x.q_descale, HEADS), ("k_descale", x.k_descale, KV_HEADS),
        ("v_descale", x.v_descale, KV_HEADS)))
    return x, layout, descales


def measure(variants: list[Variant], modules: list[ModuleType], seqlens: list[int],
            rounds: int) -> list[dict]:
    """One row a seqlen: each variant's median ms, its median per-round ratio to the first
    variant, and (up to CHECKED_UP_TO) its errors."""
    import torch
    import triton

    from kernels import dequantize_fp8, reference_attention

    rows = []
    for seq in seqlens:
        x, layout, descales = _inputs(seq)
        args = (x.q.transpose(1, 2), x.k.transpose(1, 2), x.v_t, layout, descales, SCALE, True,
                torch.bfloat16)
        calls = {v.name: (lambda m=m, v=v, args=args: m.sparse_attention_fp8_ws(
                     *args, v.stages, v.boxes)) for v, m in zip(variants, modules)}
        row: dict = {"seqlen": seq}
        if seq <= CHECKED_UP_TO:
            q, k, v = (t[:1].float() for t in dequantize_fp8(x))
            ref, ref_lse = reference_attention(q, k, v, layout, SCALE, return_lse=True)
            for name, call in calls.items():
                out, lse = call()  # out (batch, heads, seq, dim), ref (batch, seq, heads, dim)
                got = out[:1].transpose(1, 2).float()
                row[f"err_{name}"] = float((got - ref).norm() / ref.norm())
                row[f"lse_maxabs_{name}"] = float((lse[:1] - ref_lse).abs().max())
            del q, k, v, ref, ref_lse
        for call in calls.values():  # compiled and warm before the first round
            call()
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                times[name].append(triton.testing.do_bench(call, warmup=25, rep=150))
        first = times[variants[0].name]
        for name, ms in times.items():
            row[f"ms_{name}"] = statistics.median(ms)
            row[f"ratio_{name}"] = statistics.median(b / t for b, t in zip(first, ms))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x, args, calls  # the next length's inputs need the memory
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="VARIANT",
                        help="NAME=SOURCE,BOXES,STAGES; the first is the baseline")
    parser.add_argument("--seqlens", default="8192,16384,65536",
                        help="comma-separated sequence lengths (default 8192,16384,65536)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants]
        seqlens = [int(s) for s in args.seqlens.split(",")]
        if any(s <= 0 or TOKENS % s for s in seqlens):
            raise ValueError(f"--seqlens: each must divide {TOKENS}, got {args.seqlens}")
        if args.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
        if len({v.name for v in variants}) != len(variants):
            raise ValueError("variant names must differ")
        for source in {v.source for v in variants}:  # a bad one fails before the GPU work
            module_source(source)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: the A/B runs the Gluon kernel, which needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    with tempfile.TemporaryDirectory() as folder:
        modules = [load_variant(v, Path(folder)) for v in variants]
        rows = measure(variants, modules, seqlens, args.rounds)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "rounds": args.rounds,
              "variants": [vars(v) for v in variants], "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
