"""Run directories read and checked for plots and reports (results.csv, meta.json and tune.csv),
and the directories `dkbench tune` writes (tune.csv and meta.json, no results.csv).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from ..errors import BadInputError, one_line
from .check import TUNE, check_values
from .schema import (
    KEY_COLUMNS,
    NA_VALUES,
    RESULTS_FILE,
    TEXT_COLUMNS,
    read_meta,
    read_results,
)

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
TUNE_TEXT_COLUMNS = ("run_id", "case_id")  # a case_id is a hex digest: 1234567890 is one too


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
    if not path.is_dir():  # a device, FIFO or socket: listing it as a folder would raise
        raise BadInputError(f"{path}: not a regular file or a directory; give a run directory "
                            f"holding {RESULTS_FILE} or a directory of run directories")
    if (path / RESULTS_FILE).is_file():
        return [path]
    runs = [p for p in path.iterdir() if (p / RESULTS_FILE).is_file()]
    # A link beside the run it names (a "latest" link) is that run, not a second one: the folder
    # itself is kept.
    unique: dict[Path, Path] = {}
    for run in sorted(runs, key=lambda p: (p.is_symlink(), p.name)):
        unique.setdefault(run.resolve(), run)
    runs = sorted(unique.values())
    if not runs:
        raise BadInputError(f"{path}: no {RESULTS_FILE} in it or in its subdirectories")
    return runs


def _read_csv_checked(path: Path, required: Iterable[str], reader) -> pd.DataFrame:
    try:
        df = reader(path)
    except pd.errors.EmptyDataError:
        raise BadInputError(f"{path}: empty file (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: not a readable CSV ({one_line(err)})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise BadInputError(f"{path}: missing columns {', '.join(missing)}")
    return df


def read_tune(path: Path) -> pd.DataFrame | None:
    """A tune.csv as a DataFrame, or None when it is absent or has no rows yet; its
    TUNE_TEXT_COLUMNS as the text written."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    df = _read_csv_checked(path, TUNE_COLUMNS, lambda p: pd.read_csv(
        p, dtype={c: str for c in TUNE_TEXT_COLUMNS}, keep_default_na=False, na_values=NA_VALUES))
    if df.empty:
        return None
    check_values(df, path, kinds=TUNE)
    df["status"] = df["status"].fillna("").astype(str).str.strip().str.lower()
    df["is_best"] = _truthy(df["is_best"]) if "is_best" in df.columns else False
    for col in ("block_m", "block_n", "num_warps", "num_stages", "ms"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in TUNE_TEXT_COLUMNS:
        df[col] = df[col].fillna("") if col in df.columns else ""
    return df


def _read_meta(run_dir: Path) -> dict:
    """A run's or tune's meta.json, {} when absent or not an object; BadInputError naming it
    when it cannot be read (a directory, no permission) or is not JSON."""
    try:
        meta = read_meta(run_dir)
    except OSError as err:
        raise BadInputError(f"{run_dir / 'meta.json'}: cannot be read "
                            f"({err.strerror or err})") from None
    except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError
        raise BadInputError(f"{run_dir / 'meta.json'}: not valid JSON ({err})") from None
    return meta if isinstance(meta, dict) else {}


def _check_unique_rows(df: pd.DataFrame, csv: Path) -> None:
    """Refuse a row given twice, by case_id and case key (files concatenated, a row pasted
    twice): every figure and table would show it twice, where gate and merge refuse the file."""
    key = [c for c in ("case_id", *KEY_COLUMNS) if c in df.columns]
    if "provider" not in key:
        return
    twice = df[df.duplicated(key, keep=False)]
    if twice.empty:
        return
    first_group = next(iter(twice.groupby(key, dropna=False, sort=False).indices.values()))
    rows = ", ".join(str(df.index.get_loc(i) + 1) for i in twice.index[first_group])
    first = twice.iloc[0]
    case = f"case_id {first['case_id']}, " if "case_id" in key else ""
    raise BadInputError(f"{csv}: rows {rows} are one case and provider ({case}provider "
                        f"{first['provider']}); allowed: one row each (one run's results.csv, "
                        "or runs combined by `dkbench merge`)")


def load_run(run_dir: Path) -> Run:
    """Read one run directory, its TEXT_COLUMNS as the text written; raises BadInputError naming
    the file when it cannot be plotted."""
    csv = run_dir / RESULTS_FILE
    df = _read_csv_checked(csv, REQUIRED_COLUMNS, read_results)
    if df.empty:
        raise BadInputError(f"{csv}: has a header but no rows")
    check_values(df, csv)
    _check_unique_rows(df, csv)
    for col in ("provider", "mode", "dtype", "pattern", "baseline", "gpu", "status", "message"):
        if col in df.columns:
            # As objects first: a column left empty in every row reads as float (NaN).
            df[col] = df[col].astype(object).fillna("").astype(str).str.strip()
    df["status"] = df["status"].str.lower()
    df["interpreter"] = _truthy(df["interpreter"])
    for col in ("seqlen", "density", "ms", "ms_p20", "ms_p80", "tflops", "dense_tflops", "speedup"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    meta = _read_meta(run_dir)
    for col in TEXT_COLUMNS:  # read as text; an empty cell as ""
        if col in df.columns:
            df[col] = df[col].fillna("").astype(object)
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


@dataclass
class TuneDir:
    """A directory `dkbench tune` wrote: tune.csv and meta.json, no results.csv."""

    path: Path
    label: str
    meta: dict
    tune: pd.DataFrame

    @property
    def interpreter(self) -> bool:
        env = self.meta.get("environment")
        return bool(isinstance(env, dict) and env.get("interpreter"))


def find_tune_dirs(path: Path) -> list[Path]:
    """`path` itself when it is a tune directory, else its subdirectories that are (sorted); a
    run directory's tune.csv belongs to its run (`Run.tune`), so it is not listed here."""
    path = Path(path)
    if not path.is_dir() or (path / RESULTS_FILE).is_file():
        return []
    if (path / TUNE_FILE).is_file():
        return [path]
    return sorted(p for p in path.iterdir()
                  if (p / TUNE_FILE).is_file() and not (p / RESULTS_FILE).is_file())


def load_tune_dir(tune_dir: Path) -> TuneDir:
    """Read one tune directory; raises BadInputError naming the file when it cannot be drawn."""
    tune = read_tune(tune_dir / TUNE_FILE)
    if tune is None:
        raise BadInputError(f"{tune_dir / TUNE_FILE}: no rows yet")
    meta = _read_meta(tune_dir)
    env = meta.get("environment") if isinstance(meta.get("environment"), dict) else {}
    # The directory's name (tune-NAME-TIME) tells two tunings of one sweep apart.
    name, gpu = tune_dir.resolve().name, env.get("gpu") or meta.get("gpu")
    return TuneDir(tune_dir, f"{name} ({gpu})" if gpu else name, meta, tune)


def _holds_runs(path: Path) -> bool:
    path = Path(path)
    return path.is_file() or (path / RESULTS_FILE).is_file() or any(
        (p / RESULTS_FILE).is_file() for p in path.iterdir())


def load_sources(path: Path) -> tuple[list[Run], list[TuneDir]]:
    """The run directories and the tune directories under `path`: a run directory, a tune
    directory, or a directory of either. Raises BadInputError when there is neither."""
    tunes = [load_tune_dir(d) for d in find_tune_dirs(path)]
    if tunes and not _holds_runs(path):
        return [], tunes
    return load_runs(path), tunes


def check_metric(metric: str | None) -> str | None:
    """Normalise --metric; None means draw all three per-seqlen figures."""
    if metric is None:
        return None
    if metric.strip().lower() not in METRICS:
        raise BadInputError(f"--metric: unknown metric {metric!r}; choose one of "
                            f"{', '.join(METRICS)}")
    return metric.strip().lower()


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """A comma list (or sequence) of figure formats, checked against FORMATS."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise BadInputError(f"--format: unknown figure format "
                            f"{', '.join(bad) or repr(formats)}; choose from {', '.join(FORMATS)}")
    return out
