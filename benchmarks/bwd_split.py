"""Where the backward's time goes, on a Hopper GPU: the two-kernel backward (the dq kernel, then
the dk/dv kernel, each at its default config) timed whole and each kernel alone, beside the fused
backward (`kernels/bwd_fused.py`: 5 products a pair, dq added into a float32 buffer by atomics)
and the Gluon fused backward (`kernels/bwd_fused_ws.py`: 5 products, 128-key items, dq added by
tensor-memory reduces; form "fused_gluon_s<stages>").

The phi-3 sweep's shapes (`sweeps/phi3.yaml`): 65,536 tokens a batch, 32/8 heads, head_dim 128
(or ``--head-dim 64``), bf16, phi-3's pattern, sm_scale 1/head_dim. For each length, each round times every form once with
`triton.testing.do_bench`; a form's figure is its median time and the median of the per-round
ratios of the two-kernel backward's time to its own (above 1: faster than the two kernels). The
fused rows give the bytes their dq adds move (a 64-row x head_dim float32 tile per step, so the
rate of that traffic can be read off their extra time) and the largest difference of their
gradients from the two kernels' over the largest value. ``--pattern dense`` times a dense causal
layout of 64-blocks instead of phi-3's.

    python benchmarks/bwd_split.py [--seqlens 8192,16384,32768,65536] [--stages 1]
        [--gluon-stages 2] [--pattern phi3] [--head-dim 128] [--rounds 5] [--out FILE]

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

TOKENS, HEADS, KV_HEADS = 65536, 32, 8
HEAD_DIMS = (64, 128)
PHI3 = dict(block_size=64, local_blocks=16, vert_stride=8, homo_head=False,
            head_sliding_offset=1, num_heads=HEADS)
SEQLENS = (8192, 16384, 32768, 65536)


def _ints(text: str, allowed: tuple[int, ...]) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")
    bad = [x for x in values if x not in allowed]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"allowed: {', '.join(map(str, allowed))}; got {text!r}")
    return values


def _forms(q, k, v, out, lse, do, layout, stages: list[int], gluon_stages: list[int]) -> dict:
    """Every backward (or part of one) to time, each a no-argument callable returning the
    gradients it writes, (dq, dk, dv) or the one kernel's."""
    import torch

    from kernels import LaunchConfig, default_config
    from kernels.bwd import grad_like, launch_dkdv, launch_dq, sparse_attention_bwd
    from kernels.bwd_fused import sparse_attention_bwd_fused
    from kernels.bwd_fused_ws import sparse_attention_bwd_fused_ws

    dim = q.shape[3]
    dkdv = default_config("bwd", q.device, layout.block_size, dim, q.dtype)
    dq_config = default_config("dq", q.device, layout.block_size, dim, q.dtype)
    scale = 1 / dim
    dq, dk, dv = grad_like(q), grad_like(k), grad_like(v)
    delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)

    def dq_kernel():
        launch_dq(do, q, k, v, out, lse, delta, dq, layout, scale, dq_config)
        return (dq,)

    def dkdv_kernel():  # reads the delta the dq kernel wrote
        launch_dkdv(do, q, k, v, lse, delta, dk, dv, layout, scale, dkdv)
        return dk, dv

    forms = {"two_kernels": lambda: sparse_attention_bwd(do, q, k, v, out, lse, layout, scale,
                                                         dkdv, dq_config),
             "dq_kernel": dq_kernel, "dkdv_kernel": dkdv_kernel}
    for s in stages:
        config = LaunchConfig(64, 64, 4, s, "fused")
        forms[f"fused_s{s}"] = (lambda config=config: sparse_attention_bwd_fused(
            do, q, k, v, out, lse, layout, scale, config))
    for s in gluon_stages:
        forms[f"fused_gluon_s{s}"] = (lambda s=s: sparse_attention_bwd_fused_ws(
            do, q, k, v, out, lse, layout, scale, s))
    return forms


def _steps(layout, seqlen: int) -> int:
    """(64-row query step, 64-key kv tile) pairs the fused kernel walks, over every head."""
    from kernels.columns import column_plan

    cols = column_plan(layout, seqlen, seqlen)
    rows_per_pattern = HEADS // layout.heads
    return int(cols.col_ptr[-1]) * rows_per_pattern


def _pair_steps(layout, seqlen: int) -> int:
    """(64-row query step, 128-key item) pairs the Gluon fused kernel walks, over every head."""
    from kernels.bwd_fused_ws import pair_plan

    plan = pair_plan(layout, seqlen, seqlen, HEADS, KV_HEADS)
    return int(plan.row_ptr[-1])


def _layout(pattern: str, seqlen: int):
    from kernels import local_stride_layout
    from kernels.layout import dense_layout

    if pattern == "dense":
        return dense_layout(seqlen // 64, 64)
    return local_stride_layout(max_seq_len=seqlen, **PHI3)


def measure(seqlens: list[int], stages: list[int], gluon_stages: list[int], rounds: int,
            pattern: str = "phi3", dim: int = 128) -> list[dict]:
    import torch
    import triton

    from kernels.fwd_ws import sparse_attention_fwd_ws

    rows = []
    for seqlen in seqlens:
        batch = TOKENS // seqlen
        layout = _layout(pattern, seqlen).to("cuda")
        q = torch.randn(batch, seqlen, HEADS, dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, seqlen, KV_HEADS, dim, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out, lse = sparse_attention_fwd_ws(q, k, v, layout, 1 / dim, True)
        do = torch.randn_like(out)
        forms = _forms(q, k, v, out, lse, do, layout, stages, gluon_stages)
        want = [g.float().clone() for g in forms["two_kernels"]()]
        diffs = {}
        for name, run in forms.items():
            got = run()
            if name.startswith("fused"):
                diffs[name] = {g: float((x.float() - w).abs().max() / w.abs().max())
                               for g, x, w in zip(("dq", "dk", "dv"), got, want)}
        times = {name: [] for name in forms}
        for _ in range(rounds):
            for name, run in forms.items():
                times[name].append(triton.testing.do_bench(run, warmup=25, rep=150))
        step_bytes = batch * 64 * dim * 4
        dq_bytes = {"fused_s": _steps(layout, seqlen) * step_bytes,
                    "fused_gluon": _pair_steps(layout, seqlen) * step_bytes}
        base = times["two_kernels"]
        for name, ts in times.items():
            moved = next((b for f, b in dq_bytes.items() if name.startswith(f)), 0)
            row = {"seqlen": seqlen, "pattern": pattern, "head_dim": dim, "form": name,
                   "ms": statistics.median(ts),
                   "speedup_over_two_kernels": statistics.median(b / t for b, t in zip(base, ts)),
                   "dq_add_gb": moved / 1e9,
                   "rel_diff_vs_two_kernels": diffs.get(name)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlens", type=lambda t: _ints(t, SEQLENS), default=list(SEQLENS))
    parser.add_argument("--stages", type=lambda t: _ints(t, (1, 2, 3)), default=[1])
    parser.add_argument("--gluon-stages", type=lambda t: _ints(t, (1, 2, 3, 4)), default=[2])
    parser.add_argument("--pattern", choices=("phi3", "dense"), default="phi3")
    parser.add_argument("--head-dim", type=int, choices=HEAD_DIMS, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the rows as a JSON list here too")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    from kernels.bwd_fused_ws import max_stages

    most = max_stages(args.head_dim)
    if max(args.gluon_stages) > most:
        parser.error(f"--gluon-stages: at head_dim {args.head_dim} the Gluon fused backward "
                     f"takes 1 to {most} stages, got {max(args.gluon_stages)}")
    import torch

    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        print("error: needs a Hopper GPU (the backward's Gluon kernels)",
              file=sys.stderr)
        return 2
    rows = measure(args.seqlens, args.stages, args.gluon_stages, args.rounds, args.pattern,
                   args.head_dim)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
