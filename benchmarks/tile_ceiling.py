"""Rate of the forward kernel on dense causal layouts, per kv tile width, against cuDNN.

Measures how fast the kernel's inner loop can go when every kv tile is full: block 64 layouts
with 64-wide tiles and block 128 layouts with 128-wide tiles, in TFLOP/s on computed pairs.
Usage: python benchmarks/tile_ceiling.py [--seqlen 8192] [--configs 64:m128n64w4s2,128:m128n128w8s2]
"""

from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from dkbench.measure.timing import measure
from dkbench.spec.sweep import Timing
from kernels import LaunchConfig, sparse_attention
from kernels import dense_layout, kept_pairs

TIMING = Timing(warmup_ms=50, rep_ms=200)


def parse_config(text: str) -> LaunchConfig:
    """``m128n64w4s2`` (Triton) or ``gluon-m128n128w4s3`` (the Gluon forward): LaunchConfig.short."""
    match = re.fullmatch(r"(gluon-)?m(\d+)n(\d+)w(\d+)s(\d+)", text)
    if not match:
        raise SystemExit(f"--configs: {text!r} is not of the form m128n64w4s2 or "
                         "gluon-m128n128w4s3")
    impl = "gluon" if match.group(1) else "triton"
    return LaunchConfig(*(int(g) for g in match.groups()[1:]), impl)


def bench(fn) -> float:
    """Median ms, timed as `dkbench run` times one provider alone (do_bench, L2 flushed)."""
    return measure(fn, TIMING, torch.device("cuda", torch.cuda.current_device())).ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--configs", default="64:m128n64w4s2,64:m128n64w8s2,128:m128n128w4s2,"
                                          "128:m128n128w8s2,128:m128n128w8s3,128:m64n128w4s2")
    args = ap.parse_args()
    seqlen, batch = args.seqlen, 65536 // args.seqlen
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}"
          f" bf16 batch {batch} seqlen {seqlen} heads 32/8 d128 causal")
    q = torch.randn(batch, 32, seqlen, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, 8, seqlen, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / 128,
                                                  enable_gqa=True)

    flop = 4 * 128 * batch * 32 * seqlen * (seqlen + 1) / 2
    ms = bench(cudnn)
    print(f"cudnn dense causal: {ms:.3f} ms  {flop / ms / 1e9:.0f} TFLOP/s")
    ref = cudnn().float()
    for item in args.configs.split(","):
        bs, name = item.split(":")
        layout = dense_layout(seqlen // int(bs), int(bs))
        cfg = parse_config(name)
        fn = lambda: sparse_attention(q, k, v, layout, 1 / 128, seq_dim=2, config=cfg)  # noqa: E731
        try:
            ms = bench(fn)
        except Exception as exc:  # noqa: BLE001 - a config that fails is reported
            print(f"block {bs} {name}: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        err = ((fn().float() - ref).norm() / ref.norm()).item()
        flop_kept = 4 * 128 * batch * 32 * kept_pairs(layout, seqlen)
        print(f"block {bs} {name}: {ms:.3f} ms  {flop_kept / ms / 1e9:.0f} TFLOP/s  "
              f"rel err vs cudnn {err:.1e}")


if __name__ == "__main__":
    main()
