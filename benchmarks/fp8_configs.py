"""The fp8 forward's implementations and configs against our bf16 forward, on a GPU.

`sweeps/fp8.yaml` times one fp8 config a run; this times several in one process, interleaved
(each round times every variant once with `triton.testing.do_bench`), on phi-3's shapes (65,536
tokens a batch, 32/8 heads, head_dim 128, block 64, scale 1/128): the bf16 forward at its
default, the Triton fp8 kernel at its default, the Gluon fp8 kernel at several configs, and the
Gluon kernel's reordering copy of vᵀ alone (`kernels.fp8_ws.mma_key_order`, inside its time).
One JSON object a variant and seqlen: the median ms, the median of the per-round speedups over
bf16, and the relative difference of its output from the Triton fp8 kernel's.

    python benchmarks/fp8_configs.py [SEQLENS]      # e.g. 8192,65536; default 8k to 64k
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import (  # noqa: E402
    LaunchConfig,
    local_stride_layout,
    quantize_fp8,
    sparse_attention,
    sparse_attention_fp8,
)
from kernels.fp8 import fp8_triton_default  # noqa: E402
from kernels.fp8_ws import mma_key_order  # noqa: E402

TOKENS, HEADS, KV_HEADS, DIM, SCALE = 65536, 32, 8, 128, 1 / 128
PHI3 = dict(num_heads=HEADS, block_size=64, local_blocks=16, vert_stride=8,
            head_sliding_offset=1)
GLUON = {f"gluon-m128n{n}s{s}": LaunchConfig(128, n, 4, s, "gluon")
         for n, s in ((128, 2), (128, 3), (128, 4), (64, 3))}
ROUNDS, REP_MS = 5, 150


def measure(seqlen: int) -> list[dict]:
    batch = TOKENS // seqlen
    layout = local_stride_layout(max_seq_len=seqlen, **PHI3).to("cuda")
    q = torch.randn(batch, seqlen, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, seqlen, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    x = quantize_fp8(q, k, v, "head")

    def fp8_with(config: LaunchConfig):
        return lambda: sparse_attention_fp8(x.q, x.k, x.v_t, layout, x.q_descale, x.k_descale,
                                            x.v_descale, sm_scale=SCALE, config=config)

    variants = {"bf16": lambda: sparse_attention(q, k, v, layout, sm_scale=SCALE),
                "fp8-triton-default": fp8_with(fp8_triton_default(q.device, 64, DIM)),
                **{name: fp8_with(config) for name, config in GLUON.items()}}
    triton_out = variants["fp8-triton-default"]().double()
    diff = {name: float((fn().double() - triton_out).norm() / triton_out.norm())
            for name, fn in variants.items()}
    del triton_out
    variants["mma_key_order copy"] = lambda: mma_key_order(x.v_t)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=REP_MS))
    # The speedup is the inverse of the median per-round ratio of times, as the harness's.
    return [dict(seqlen=seqlen, variant=name, ms=statistics.median(t),
                 speedup_vs_bf16=1 / statistics.median(a / b for a, b in zip(t, times["bf16"])),
                 rel_diff_vs_triton_fp8=diff.get(name))
            for name, t in times.items()]


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("fp8_configs.py needs a CUDA GPU")
    seqlens = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else [
        8192, 16384, 32768, 65536]
    for seqlen in seqlens:
        for row in measure(seqlen):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
