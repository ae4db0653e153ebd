"""The results schema: one `ResultRow` per case x provider, appended to `results.csv` as measured."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

import pandas as pd

RESULTS_FILE = "results.csv"
META_FILE = "meta.json"

STATUSES = ("ok", "oom", "unsupported", "error", "wrong")


@dataclass
class ResultRow:
    """One measured (or failed) case x provider. Field order is the CSV's column order."""

    # -- provenance --
    run_id: str
    timestamp: str
    gpu: str
    torch_version: str
    triton_version: str
    git_sha: str
    interpreter: bool  # True when Triton kernels ran through TRITON_INTERPRET (timings meaningless)
    # -- case key --
    case_id: str
    provider: str
    mode: str
    dtype: str
    batch: int
    seqlen: int
    q_len: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    pattern: str
    pattern_hash: str
    block_size: int
    density: float
    seed: int
    # -- launch config --
    config: str = ""
    config_source: str = ""
    # -- timing --
    timer: str = ""
    ms: float = float("nan")
    ms_p20: float = float("nan")
    ms_p80: float = float("nan")
    build_ms: float = float("nan")
    # -- metrics --
    flops: float = float("nan")
    tflops: float = float("nan")
    dense_tflops: float = float("nan")
    baseline: str = ""
    speedup: float = float("nan")
    # p20/p80 of the per-round ratios when the providers were timed interleaved (else NaN)
    speedup_p20: float = float("nan")
    speedup_p80: float = float("nan")
    sparsity_efficiency: float = float("nan")
    peak_mem_mb: float = float("nan")
    max_abs_err: float = float("nan")
    rel_err: float = float("nan")
    # -- outcome --
    status: str = "ok"
    message: str = ""
    command: str = ""


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ResultRow))

# The columns that identify a case x provider across runs (used by resume, gate and merge).
KEY_COLUMNS: tuple[str, ...] = (
    "provider", "mode", "dtype", "batch", "seqlen", "q_len", "heads", "kv_heads",
    "head_dim", "causal", "pattern", "block_size",
)


def append_row(path: Path, row: ResultRow) -> None:
    """Append one row to a CSV (writing the header first if the file is new), flushed to disk.

    A file written by an older version keeps its own columns (a resumed run): the row fills those,
    so no value ever lands under another column's name.
    """
    new = not path.exists() or path.stat().st_size == 0
    header = list(COLUMNS) if new else _header(path)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(dataclasses.asdict(row))
        fh.flush()
        os.fsync(fh.fileno())


def _header(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh), None) or list(COLUMNS)


def read_results(path: Path) -> pd.DataFrame:
    """Read a results CSV (or the one inside a run directory) into a DataFrame."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    return pd.read_csv(path, keep_default_na=False, na_values=["nan", "NaN", ""])


def write_meta(run_dir: Path, meta: dict) -> None:
    tmp = run_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    tmp.replace(run_dir / META_FILE)


def read_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def done_keys(rows: Iterable[dict]) -> set[tuple[str, str]]:
    """(case_id, provider) pairs already present, for --resume."""
    return {(str(r["case_id"]), str(r["provider"])) for r in rows}
