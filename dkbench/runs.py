"""Run directories read and checked for plots and reports: results.csv, meta.json and tune.csv."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from dkbench.errors import BadInputError
from dkbench.results import RESULTS_FILE, read_meta, read_results

TUNE_FILE = "tune.csv"
METRICS = ("ms", "tflops", "speedup")
FORMATS = ("png", "svg")
INTERPRETER_NOTE = "interpreter timings (CPU, not meaningful for performance)"

REQUIRED_COLUMNS = (
    "gpu", "interpreter", "provider", "mode", "dtype", "seqlen", "pattern", "density",
    "ms", "ms_p20", "ms_p80", "tflops", "dense_tflops", "baseline", "speedup", "status",
)
TUNE_COLUMNS = ("case_id", "kernel", "block_m", "block_n", "num_warps", "num_stages", "ms",
                "status")


@dataclass
class Run:
    """One run directory, read and checked. `results` gains a `run` column holding `label`."""

    path: Path
    label: str
    results: pd.DataFrame
    meta: dict
    tune: pd.DataFrame | None

    @property
    def interpreter(self) -> bool:
        return bool(self.results["interpreter"].any())


def _truthy(col: pd.Series) -> pd.Series:
    return col.astype(str).str.strip().str.lower().isin(("true", "1", "yes"))


def find_run_dirs(path: Path) -> list[Path]:
    """`path` itself when it holds results.csv, else its subdirectories that do (sorted)."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name == RESULTS_FILE:
            return [path.parent]
        raise BadInputError(f"{path}: is a file; give a run directory holding {RESULTS_FILE} "
                            "or a directory of run directories")
    if (path / RESULTS_FILE).is_file():
        return [path]
    runs = sorted(p for p in path.iterdir() if (p / RESULTS_FILE).is_file())
    if not runs:
        raise BadInputError(f"{path}: no {RESULTS_FILE} in it or in its subdirectories")
    return runs


def _read_csv_checked(path: Path, required: Iterable[str], reader) -> pd.DataFrame:
    try:
        df = reader(path)
    except pd.errors.EmptyDataError:
        raise BadInputError(f"{path}: empty file (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise BadInputError(f"{path}: missing columns {', '.join(missing)}")
    return df


def read_tune(path: Path) -> pd.DataFrame | None:
    """A tune.csv as a DataFrame, or None when it is absent or has no rows yet."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    df = _read_csv_checked(path, TUNE_COLUMNS, lambda p: pd.read_csv(
        p, keep_default_na=False, na_values=["nan", "NaN", ""]))
    if df.empty:
        return None
    df["status"] = df["status"].fillna("").astype(str).str.strip().str.lower()
    df["is_best"] = _truthy(df["is_best"]) if "is_best" in df.columns else False
    for col in ("block_m", "block_n", "num_warps", "num_stages", "ms"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def load_run(run_dir: Path) -> Run:
    """Read one run directory; raises BadInputError naming the file when it cannot be plotted."""
    csv = run_dir / RESULTS_FILE
    df = _read_csv_checked(csv, REQUIRED_COLUMNS, read_results)
    if df.empty:
        raise BadInputError(f"{csv}: has a header but no rows")
    for col in ("provider", "mode", "dtype", "pattern", "baseline", "gpu", "status", "message"):
        if col in df.columns:
            df[col] = df[col].fillna("").astype(str).str.strip()
    df["status"] = df["status"].str.lower()
    df["interpreter"] = _truthy(df["interpreter"])
    for col in ("seqlen", "density", "ms", "ms_p20", "ms_p80", "tflops", "dense_tflops", "speedup"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    try:
        meta = read_meta(run_dir)
    except ValueError as err:  # json.JSONDecodeError
        raise BadInputError(f"{run_dir / 'meta.json'}: not valid JSON ({err})") from None
    meta = meta if isinstance(meta, dict) else {}
    return Run(run_dir, "", df, meta, read_tune(run_dir / TUNE_FILE))


def load_runs(path: Path) -> list[Run]:
    """Every run under `path`, labelled "name (GPU)": meta.json's name (else the directory's) and
    the CSV's gpu column."""
    runs = [load_run(d) for d in find_run_dirs(path)]
    names = [str(r.meta.get("name") or r.path.resolve().name) for r in runs]
    if len(set(names)) < len(names):  # two runs of one spec: the directory tells them apart
        names = [r.path.resolve().name for r in runs]
    for run, name in zip(runs, names):
        gpus = ", ".join(sorted({g for g in run.results["gpu"] if g}))
        run.label = f"{name} ({gpus})" if gpus else name
        run.results["run"] = run.label
    return runs


def check_metric(metric: str | None) -> str | None:
    """Normalise --metric; None means draw all three per-seqlen figures."""
    if metric is None:
        return None
    if metric.strip().lower() not in METRICS:
        raise BadInputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric.strip().lower()


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """A comma list (or sequence) of figure formats, checked against FORMATS."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise BadInputError(f"unknown figure format {', '.join(bad) or repr(formats)}; "
                            f"choose from {', '.join(FORMATS)}")
    return out
