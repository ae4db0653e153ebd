"""Timing a step: device events through triton.testing on a GPU, wall clock in the interpreter.

`do_bench`'s warmup and rep are milliseconds, and it flushes L2 before each call;
`do_bench_cudagraph` replays a captured graph and does not flush. The row records which was used.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .spec import Timing

# In the interpreter a step takes seconds; a few repetitions check the pipeline, nothing more.
INTERPRETER_REPS = 3


@dataclass(frozen=True)
class Measurement:
    ms: float
    p20: float
    p80: float
    timer: str
    samples: int


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples: list[float], timer: str) -> Measurement:
    return Measurement(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8),
                       timer, len(samples))


def measure(fn: Callable[[], object], timing: Timing, device: torch.device) -> Measurement:
    """Median, p20 and p80 milliseconds of ``fn`` (already warmed up: compiled and tuned)."""
    if device.type != "cuda":
        samples = []
        for _ in range(INTERPRETER_REPS):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return summarize(samples, "interpreter-wallclock")
    import triton.testing

    if timing.cuda_graph:
        with torch.cuda.stream(torch.cuda.Stream()):
            samples = triton.testing.do_bench_cudagraph(fn, rep=timing.rep_ms, return_mode="all")
        return summarize(list(samples), "do_bench_cudagraph")
    samples = triton.testing.do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms,
                                      return_mode="all")
    return summarize(list(samples), "do_bench")


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak device memory (MB) while ``fn`` runs once, inputs and outputs included."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20
