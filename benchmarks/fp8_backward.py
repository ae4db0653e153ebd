"""The fp8 backward's two forms against the bf16 training step, on one GPU, in one process.

At phi-3's pattern (65,536 tokens a batch, 32 query and 8 kv heads, head_dim 128) for each
sequence length given: the bf16 forward and forward+backward (`sparse_attention`, its looked-up
configs), the fp8 forward, and the fp8 forward+backward (`sparse_attention_fp8_trainable` on a
kept quantisation) with each backward form (`FP8_BWD_IMPLS`) and, for the "fp8" form, each
config pair below; the backward alone; the gradients' relative error against the bf16 step's;
and each kernel's time in the backward (the profiler's, per call). Medians of CUDA-event timings.

    python benchmarks/fp8_backward.py --out results/fp8_backward.json 16384 65536
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from kernels import (
    Fp8BwdConfigs,
    LaunchConfig,
    local_stride_layout,
    quantize_fp8,
    sparse_attention,
    sparse_attention_fp8,
    sparse_attention_fp8_bwd,
    sparse_attention_fp8_trainable,
)

PHI3 = dict(num_heads=32, block_size=64, local_blocks=16, vert_stride=8, head_sliding_offset=1)
TOKENS, HEADS, KV_HEADS, DIM, SCALE = 65536, 32, 8, 128, 1 / 128
# (label, backward form, fp8 configs: dk/dv then dq)
FORMS = [
    ("fp8 dkdv m64n32w4s2 dq m64n64w4s2", "fp8", ((64, 32, 4, 2), (64, 64, 4, 2))),
    ("fp8 dkdv m64n64w4s2 dq m64n64w4s2", "fp8", ((64, 64, 4, 2), (64, 64, 4, 2))),
    ("fp8 dkdv m64n32w4s2 dq m64n32w4s2", "fp8", ((64, 32, 4, 2), (64, 32, 4, 2))),
    ("bf16", "bf16", None),
]


def median_ms(fn, reps: int = 15) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_ms(fn, calls: int = 3) -> dict[str, float]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key[:60]: round(e.device_time_total / calls / 1000, 3)
            for e in prof.key_averages() if e.device_time_total / calls > 20}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def measure(seqlen: int) -> dict:
    batch = TOKENS // seqlen
    layout = local_stride_layout(max_seq_len=seqlen, **PHI3)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(heads: int) -> torch.Tensor:
        return torch.randn(batch, seqlen, heads, DIM, device="cuda", dtype=torch.bfloat16,
                           generator=gen)

    q, k, v = (randn(h).requires_grad_() for h in (HEADS, KV_HEADS, KV_HEADS))
    do = randn(HEADS)
    x = quantize_fp8(q.detach(), k.detach(), v.detach(), "head")

    def bf16_step():
        return torch.autograd.grad(sparse_attention(q, k, v, layout, sm_scale=SCALE), (q, k, v),
                                   do)

    row = {"seqlen": seqlen, "batch": batch,
           "bf16_fwd_ms": median_ms(lambda: sparse_attention(q.detach(), k.detach(), v.detach(),
                                                              layout, sm_scale=SCALE)),
           "bf16_fwd_bwd_ms": median_ms(bf16_step),
           "bf16_kernels_ms": kernel_ms(bf16_step),
           "fp8_fwd_ms": median_ms(lambda: sparse_attention_fp8(
               x.q, x.k, x.v_t, layout, x.q_descale, x.k_descale, x.v_descale, sm_scale=SCALE)),
           "forms": {}}
    want = bf16_step()
    out, lse = sparse_attention_fp8(x.q, x.k, x.v_t, layout, x.q_descale, x.k_descale,
                                    x.v_descale, sm_scale=SCALE, return_lse=True)
    for label, impl, pair in FORMS:
        configs = None if pair is None else Fp8BwdConfigs(*(LaunchConfig(*c) for c in pair))

        def step():
            out = sparse_attention_fp8_trainable(q, k, v, layout, sm_scale=SCALE, quantized=x,
                                                 bwd_configs=configs, bwd_impl=impl)
            return torch.autograd.grad(out, (q, k, v), do)

        def backward():
            return sparse_attention_fp8_bwd(do, x, out, lse, layout, sm_scale=SCALE,
                                            configs=configs, impl=impl)

        fwd_bwd = median_ms(step)
        row["forms"][label] = {
            "fwd_bwd_ms": fwd_bwd, "bwd_ms": median_ms(backward),
            "speedup_over_bf16": row["bf16_fwd_bwd_ms"] / fwd_bwd,
            "rel_err_vs_bf16": dict(zip(("dq", "dk", "dv"),
                                        (rel(g, w) for g, w in zip(step(), want)))),
            "kernels_ms": kernel_ms(backward)}
        print(seqlen, label, json.dumps({k: v for k, v in row["forms"][label].items()
                                         if k != "kernels_ms"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seqlens", nargs="*", type=int, default=[16384, 65536])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    rows = []
    for seqlen in args.seqlens:
        rows.append(measure(seqlen))
        torch.cuda.empty_cache()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
