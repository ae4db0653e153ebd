"""Run directories for the plot and report tests, built from `ResultRow` under a tmp_path.

One run: providers dkernel and flex (sparse) against the baseline sdpa_flash (dense), fwd and bwd,
fp16, three sequence lengths spanning decades of latency, a tune.csv, and failed rows of every
status. Failed rows carry junk numbers (`JUNK`) so a test can tell whether they were drawn.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import replace
from pathlib import Path

from dkbench.results.schema import RESULTS_FILE, ResultRow, append_row

BASELINE = "sdpa_flash"
PROVIDERS = ("dkernel", "flex", "sdpa_flash")
SEQLENS = (1024, 4096, 16384)
DENSITY = {1024: 0.5, 4096: 0.25, 16384: 0.0625}  # a local-stride layout thins out as seqlen grows
EFFICIENCY = {1024: 0.6, 4096: 0.85, 16384: 1.0}  # short sequences leave the GPU underused
PATTERN = "local_stride(local=4,vert=2)"
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
JUNK = {"ms": 123.0, "tflops": 777.0, "speedup": 55.5}
# (provider, mode, seqlen) -> (status, message); flex has no backward at all.
FAILURES = {
    ("flex", "fwd", 16384): ("oom", "CUDA out of memory. Tried to allocate 8.00 GiB"),
    ("dkernel", "bwd", 4096): ("wrong", "max_abs_err 0.51 > tol 0.01 | dq"),
    ("sdpa_flash", "bwd", 16384): ("error", "RuntimeError: kernel launch failed"),
    **{("flex", "bwd", s): ("unsupported", "flex backward needs torch.compile") for s in SEQLENS},
}
META = {
    "name": "local-stride-sweep", "gpu": H100, "torch": "2.11.0+cu130", "triton": "3.6.0",
    "python": "3.12.3", "spec": "sweeps/local_stride.yaml",
    "command": "dkbench run sweeps/local_stride.yaml --out results/ls",
}
TUNE_CASE = "ls-fwd-4096"
TUNE_COLUMNS = ("run_id", "case_id", "kernel", "dtype", "seqlen", "heads", "kv_heads", "head_dim",
                "block_size", "pattern", "block_m", "block_n", "num_warps", "num_stages", "ms",
                "ms_p20", "ms_p80", "status", "message", "is_best", "speedup_vs_default")
TUNE_OOM = (128, 64, 4, 3)  # (block_m, block_n, num_warps, num_stages) that failed
TUNE_MISSING = (128, 32, 8, 2)  # pruned: no row at all
TUNE_BEST = (64, 64, 8, 3)


def _ms(provider: str, mode: str, seqlen: int, sparse_gain: float = 1.0) -> float:
    dense = 0.06 * (seqlen / 1024) ** 2 * (2.5 if mode == "bwd" else 1.0) / EFFICIENCY[seqlen]
    if provider == BASELINE:
        return dense
    return dense * DENSITY[seqlen] * (1.2 if provider == "dkernel" else 1.8) / sparse_gain


def make_row(provider: str, mode: str, seqlen: int, gpu: str = H100, interpreter: bool = False,
             run_id: str = "run1", speed: float = 1.0, sparse_gain: float = 1.0) -> ResultRow:
    """One row; failed per FAILURES (with junk numbers), else consistent ms/TFLOP/s/speedup.
    `speed` scales every provider (another GPU), `sparse_gain` only the sparse ones."""
    density = 1.0 if provider == BASELINE else DENSITY[seqlen]
    dense_flops = 4 * 1 * 8 * seqlen * seqlen * 64 / 2 * (2.5 if mode == "bwd" else 1.0)
    ms = _ms(provider, mode, seqlen, sparse_gain) / speed
    row = ResultRow(
        run_id=run_id, timestamp="2026-11-24T10:00:00", gpu=gpu, torch_version="2.11.0+cu130",
        triton_version="3.6.0", git_sha="abc1234", interpreter=interpreter,
        case_id=f"ls-{mode}-{seqlen}", provider=provider, mode=mode, dtype="fp16", batch=1,
        seqlen=seqlen, q_len=seqlen, heads=8, kv_heads=8, head_dim=64, causal=True, pattern=PATTERN,
        pattern_hash="ph1", block_size=64, density=DENSITY[seqlen], seed=0,
        config="BLOCK_M=64,BLOCK_N=64", config_source="default", timer="do_bench",
        ms=ms, ms_p20=ms * 0.95, ms_p80=ms * 1.05,
        flops=dense_flops * density, tflops=dense_flops * density / (ms * 1e-3) / 1e12,
        dense_tflops=dense_flops / (ms * 1e-3) / 1e12, baseline=BASELINE,
        speedup=_ms(BASELINE, mode, seqlen) / _ms(provider, mode, seqlen, sparse_gain),
        command="dkbench run sweeps/local_stride.yaml",
    )
    if (provider, mode, seqlen) in FAILURES:
        status, message = FAILURES[(provider, mode, seqlen)]
        row = replace(row, status=status, message=message, **JUNK)
    if (BASELINE, mode, seqlen) in FAILURES and provider != BASELINE:
        row = replace(row, speedup=float("nan"))  # no baseline measurement, no speedup
    return row


def sample_rows(**kwargs) -> list[ResultRow]:
    return [make_row(p, m, s, **kwargs) for m in ("fwd", "bwd") for s in SEQLENS for p in PROVIDERS]


def _tune_ms(bm: int, bn: int, warps: int, stages: int) -> float:
    """Fastest at 64x64 tiles, 8 warps, 3 stages (TUNE_BEST)."""
    return (0.2 + abs(bm - 64) / 160 + abs(bn - 64) / 200 + (0.05 if warps == 4 else 0)
            + (0.03 if stages == 2 else 0))


def tune_rows() -> list[dict]:
    """A tune.csv for one case and both kernels: 3x2 tiles per (num_warps, num_stages), 2x2."""
    shape = {"run_id": "run1", "case_id": TUNE_CASE, "dtype": "fp16", "seqlen": 4096, "heads": 8,
             "kv_heads": 8, "head_dim": 64, "block_size": 64, "pattern": PATTERN}
    rows = []
    for kernel, bm, bn, warps, stages in itertools.product(("fwd", "bwd"), (32, 64, 128), (32, 64),
                                                           (4, 8), (2, 3)):
        key = (bm, bn, warps, stages)
        if key == TUNE_MISSING:
            continue
        ms = _tune_ms(*key)
        failed = key == TUNE_OOM
        rows.append({
            **shape, "kernel": kernel, "block_m": bm, "block_n": bn, "num_warps": warps,
            "num_stages": stages, "ms": JUNK["ms"] if failed else ms, "ms_p20": ms * 0.97,
            "ms_p80": ms * 1.03, "status": "oom" if failed else "ok",
            "message": "out of shared memory" if failed else "", "is_best": key == TUNE_BEST,
            "speedup_vs_default": 1.31 if key == TUNE_BEST else 1.0,
        })
    return rows


def write_run(run_dir: Path, rows: list[ResultRow], meta: dict | None = None,
              tune: list[dict] | None = None) -> Path:
    """A run directory: results.csv from `rows`, meta.json, and tune.csv when `tune` is given."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        append_row(run_dir / RESULTS_FILE, row)
    if meta is not None:
        (run_dir / "meta.json").write_text(json.dumps(meta))
    if tune is not None:
        with open(run_dir / "tune.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=TUNE_COLUMNS)
            writer.writeheader()
            writer.writerows(tune)
    return run_dir


def single_run(tmp_path: Path, interpreter: bool = False) -> Path:
    return write_run(tmp_path / "ls", sample_rows(interpreter=interpreter), META, tune_rows())


def multi_run(tmp_path: Path) -> Path:
    """A directory of two runs of the same sweep, on an A100 and an H100 (the H100 one tuned)."""
    parent = tmp_path / "runs"
    a100 = sample_rows(gpu=A100, run_id="ra", speed=0.5, sparse_gain=0.8)
    write_run(parent / "a100", a100, {**META, "name": "nightly-a100", "gpu": A100})
    write_run(parent / "h100", sample_rows(run_id="rh"), {**META, "name": "nightly-h100"},
              tune_rows())
    return parent
