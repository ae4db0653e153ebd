"""Interleaved A/B of the Gluon forward's and dq kernel's two forms on random block patterns, on
a GPU: the union's steps (`kernels/fwd_ws.py`, `kernels/bwd_dq_ws.py`) against owned steps
(`kernels/fwd_halves.py`, `kernels/bwd_dq_halves.py`), each at its default config.

The patterns sweep's shapes (`sweeps/patterns.yaml`): 65,536 tokens a batch, 32/8 heads,
head_dim 128, bf16, block 64, one random pattern per query head (seed 0), sm_scale 1/128. For
each density and kernel, each round times both forms once with `triton.testing.do_bench`; the
figure is the median of the per-round ratios of the union's time to the owned steps' (above 1:
owned steps faster), with each form's median time and TFLOP/s on kept pairs (the dq kernel's
three products a pair against the forward's two), whether the dispatch would take owned steps
there, and the largest difference between the two forms' outputs.

    python benchmarks/ab_fwd_halves.py [--densities 0.05,0.2,0.5] [--seqlen 16384]
        [--rounds 5] [--out FILE]

Exit status 2 on a bad argument or without a Hopper GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS, HEADS, KV_HEADS, DIM, BLOCK, SCALE = 65536, 32, 8, 128, 64, 1 / 128
# The default configs': the forward's 128-key steps at three stages (four do not fit at
# head_dim 128), the dq kernel's 64-key steps at four.
FORMS = {"fwd": (2, 3), "dq": (1, 4)}  # kernel: (64-key boxes a step, stages)


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    if not values or not all(0 < x <= 1 for x in values):
        raise argparse.ArgumentTypeError(f"densities must be in (0, 1], got {text!r}")
    return values


def _forms(kernel: str, q, k, v, layout, boxes: int, stages: int) -> dict:
    """The union's and the owned steps' launch of ``kernel``, each a no-argument callable
    returning the output it writes."""
    import torch

    from kernels import bwd_dq_halves, bwd_dq_ws, fwd_halves, fwd_ws

    if kernel == "fwd":
        return {
            "union": lambda: fwd_ws.sparse_attention_fwd_ws(q, k, v, layout, SCALE, True,
                                                            stages=stages, boxes=boxes)[0],
            "halves": lambda: fwd_halves.sparse_attention_fwd_halves(
                q, k, v, layout, SCALE, True, stages=stages, boxes=boxes)[0],
        }
    out, lse = fwd_ws.sparse_attention_fwd_ws(q, k, v, layout, SCALE, True)
    do = torch.randn_like(out)
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q)

    def launch(form) -> torch.Tensor:
        form(do, q, k, v, out, lse, delta, dq, layout, SCALE, stages=stages, boxes=boxes)
        return dq

    return {"union": lambda: launch(bwd_dq_ws.sparse_attention_dq_ws),
            "halves": lambda: launch(bwd_dq_halves.sparse_attention_dq_halves)}


def measure(densities: list[float], seqlen: int, rounds: int) -> list[dict]:
    import torch
    import triton

    from kernels import random_layout
    from kernels.halves_plan import halves_pay
    from kernels.layout import kept_pairs

    rows = []
    batch = TOKENS // seqlen
    for density in densities:
        layout = random_layout(HEADS, seqlen // BLOCK, BLOCK, density, seed=0).to("cuda")
        q = torch.randn(batch, seqlen, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, seqlen, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        for kernel, (boxes, stages) in FORMS.items():
            forms = _forms(kernel, q, k, v, layout, boxes, stages)
            outs = {name: run().float().clone() for name, run in forms.items()}
            times = {name: [] for name in forms}
            for _ in range(rounds):
                for name, run in forms.items():
                    times[name].append(triton.testing.do_bench(run, warmup=25, rep=150))
            products = 2 if kernel == "fwd" else 3
            flop = 2 * products * kept_pairs(layout, seqlen) * DIM * HEADS * batch
            row = {"kernel": kernel, "density": density, "seqlen": seqlen, "boxes": boxes,
                   "stages": stages,
                   "dispatch_takes_halves": halves_pay(layout, seqlen, stages, boxes),
                   "speedup": statistics.median(u / h for u, h in zip(times["union"],
                                                                      times["halves"])),
                   "max_abs_diff": float((outs["union"] - outs["halves"]).abs().max())}
            for name, ts in times.items():
                row[f"{name}_ms"] = statistics.median(ts)
                row[f"{name}_tflops"] = flop / statistics.median(ts) / 1e9
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--densities", type=_floats, default=[0.05, 0.1, 0.2, 0.35, 0.5])
    parser.add_argument("--seqlen", type=int, default=16384, choices=[4096, 8192, 16384, 32768])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the rows as a JSON list here too")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    import torch

    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        print("error: needs a Hopper GPU (the Gluon kernels run on compute capability 9.x)",
              file=sys.stderr)
        return 2
    rows = measure(args.densities, args.seqlen, args.rounds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
