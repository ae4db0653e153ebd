"""Time the bundled kernel's launch configs on the phi-3 pattern against cuDNN SDPA, same run.

A quick scan for kernel work (see kernels/PERF.md); `dkbench tune` is the user-facing tuner.
Usage: python benchmarks/phi3_scan.py [--seqlens 8192,65536] [--modes fwd,bwd] [--out FILE]
       [--configs m128n64w4s2,gluon-m128n128w4s3] [--tma on,off]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import re

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import LaunchConfig, fwd, local_stride_layout, reference_attention, sparse_attention
from kernels.configs import config_problems


def parse_config(text: str) -> LaunchConfig:
    """``m128n64w4s2`` (Triton) or ``gluon-m128n128w4s3`` (the Gluon forward)."""
    match = re.fullmatch(r"(gluon-)?m(\d+)n(\d+)w(\d+)s(\d+)", text)
    if not match:
        raise SystemExit(f"--configs: {text!r} is not of the form m128n64w4s2 or "
                         "gluon-m128n128w4s3")
    impl = "gluon" if match.group(1) else "triton"
    return LaunchConfig(*(int(g) for g in match.groups()[1:]), impl)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="8192,65536")
    ap.add_argument("--modes", default="fwd,bwd")
    ap.add_argument("--block-m", default="64,128")
    ap.add_argument("--block-n", default="32,64")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--configs", default="",
                    help="explicit configs (m128n64w4s2, gluon-m128n128w4s3, ...) instead of the "
                         "block/warps/stages grid of Triton configs")
    ap.add_argument("--tma", default="on",
                    help="tensor-descriptor loads (forward k/v, dk/dv q/dO): on, off or on,off; "
                         "off also turns the Gluon forward off (it loads through descriptors only)")
    ap.add_argument("--check-upto", type=int, default=16384,
                    help="check the forward of the first sequence against the float32 reference "
                         "up to this length")
    ap.add_argument("--out", default="phi3_scan.csv")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    gpu = torch.cuda.get_device_name()
    print(f"{gpu} torch {torch.__version__} triton {triton.__version__}")
    rows = []
    for seqlen in ints(args.seqlens):
        batch = 65536 // seqlen
        layout = local_stride_layout(32, seqlen, 64, 16, 8, head_sliding_offset=1)
        q = torch.randn(batch, 32, seqlen, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, 8, seqlen, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ref = None
        if seqlen <= args.check_upto:
            ref = reference_attention(q[:1], k[:1], v[:1], layout, 1 / 128, seq_dim=2).float()
        for mode in args.modes.split(","):
            grad = mode != "fwd"
            for t in (q, k, v):
                t.requires_grad_(grad)
            dout = torch.randn_like(q)

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / 128,
                                                          enable_gqa=True)

            def step(attn):
                if mode == "fwd":
                    return attn
                out = attn()
                return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

            base = bench(step(cudnn))
            print(f"seqlen {seqlen} {mode}: cudnn {base:.3f} ms")
            rows.append(dict(gpu=gpu, seqlen=seqlen, mode=mode, provider="sdpa_cudnn", config="",
                             tma="", ms=base, ratio=1.0, rel_err=""))
            if args.configs:
                configs = [parse_config(c) for c in args.configs.split(",")]
            else:
                configs = [LaunchConfig(*c) for c in itertools.product(
                    ints(args.block_m), ints(args.block_n), ints(args.warps), ints(args.stages))]
            for cfg, tma in itertools.product(configs, args.tma.split(",")):
                if config_problems(cfg, 64, 128, "bwd" if grad else "fwd"):
                    continue
                fwd.TMA_LOADS = tma == "on"
                kw = {"bwd_config": cfg} if grad else {"config": cfg}
                try:
                    ms = bench(step(lambda: sparse_attention(q, k, v, layout, 1 / 128, seq_dim=2,
                                                             **kw)))
                except Exception as exc:  # noqa: BLE001 - a config that fails is reported
                    print(f"  {cfg.short()} tma {tma}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                err = float("nan")
                if ref is not None and not grad:
                    out = sparse_attention(q[:1], k[:1], v[:1], layout, 1 / 128, seq_dim=2, **kw)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                print(f"  {cfg.short()} tma {tma}: {ms:.3f} ms  ratio {ms / base:.3f}"
                      f"  rel err {err:.2e}")
                rows.append(dict(gpu=gpu, seqlen=seqlen, mode=mode, provider="dkbench",
                                 config=cfg.short(), tma=tma, ms=ms, ratio=ms / base,
                                 rel_err=err))
        q = k = v = ref = None  # free before the next length
        torch.cuda.empty_cache()
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
