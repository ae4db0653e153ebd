"""The results schema: one `ResultRow` per case x provider, appended to `results.csv` as measured."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import json
import os
import warnings
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from ..errors import BadInputError, ResultsWriteError, TornRowWarning

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
    # -- speed of light (last, so that files written before them resume) --
    # The least time the row's FLOPs and bytes allow at this GPU's calibrated matrix rate and
    # bandwidth (dkbench.measure.sol), and 100 * sol_ms / ms; NaN where no calibration exists (the CPU).
    sol_ms: float = float("nan")
    sol_pct: float = float("nan")
    # The bytes of device memory the row's work moves in that model (sol.row_bytes): with flops,
    # its arithmetic intensity on the roofline.
    row_bytes: float = float("nan")
    # -- telemetry (dkbench.measure.telemetry): NVML readings taken while the row's calls ran;
    # NaN without NVML or a GPU. --
    clock_mhz_median: float = float("nan")
    clock_mhz_min: float = float("nan")
    power_w_median: float = float("nan")
    temp_c_max: float = float("nan")
    # -- the KV cache's layout (decode; last, so that files written before it resume) --
    # Tokens per page of a paged KV cache; 0 for a contiguous one, and in every other mode.
    page_size: int = 0
    # -- where a run's time goes (last, so that files written before it resume) --
    # Wall time from the start of the row's preparation until its step was ready to time: the
    # provider's prepare (build_ms), the check, the warm-up call (where most providers compile) and
    # the peak-memory call. NaN where the row never got that far.
    setup_ms: float = float("nan")


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ResultRow))

# Provenance columns read back as the text written: pandas would read the sha 338e663124 as a
# float (inf) and 0123456 as the integer 123456; a message column left empty on every row would
# read as floats.
TEXT_COLUMNS: tuple[str, ...] = (
    "run_id", "timestamp", "torch_version", "triton_version", "git_sha", "case_id",
    "pattern_hash", "config", "config_source", "timer", "command", "message")
NA_VALUES = ["nan", "NaN", ""]

# The columns that identify a case x provider across runs (used by resume, gate and merge).
KEY_COLUMNS: tuple[str, ...] = (
    "provider", "mode", "dtype", "batch", "seqlen", "q_len", "heads", "kv_heads",
    "head_dim", "causal", "pattern", "block_size", "page_size",
)
# Columns added after files were committed, with the value every older row means: read_results
# fills them in, so an old file still keys, gates and plots against a new one.
LATER_COLUMNS: dict[str, object] = {"page_size": 0}


def append_row(path: Path, row: ResultRow) -> None:
    """Append one row to a CSV (writing the header first if the file is new), fsynced to disk.

    The row (with the header, for a new file) goes out in one write call, so a run killed mid-row
    leaves at most one torn last line, which the next read sets aside (`heal_results`); a failed
    write is cut back off, so nothing is ever appended onto a partial line. A file written by an
    older version keeps its own columns (a resumed run): the row fills those, so no value ever
    lands under another column's name. Raises ResultsWriteError naming the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size if path.exists() else 0
        if size and _last_byte(path) != b"\n":
            torn = heal_results(path)
            if torn is not None:
                warnings.warn(torn, stacklevel=2)
            size = path.stat().st_size
            if size and _last_byte(path) != b"\n":
                raise ResultsWriteError(f"{path}: does not end in a whole line and is not a "
                                        "results CSV; refusing to append to it")
        header = list(COLUMNS) if size == 0 else _header(path)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=header, restval="", extrasaction="ignore")
        if size == 0:
            writer.writeheader()
        writer.writerow(dataclasses.asdict(row))
        _append_whole(path, text.getvalue().encode())
    except OSError as exc:
        raise ResultsWriteError(f"{path}: cannot write a row: {_reason(exc)} (the rows before it "
                                "are intact)") from None


def _write(fd: int, data: bytes) -> int:
    # The one write call of a row; a seam for the fault-injection tests (disk full midway).
    return os.write(fd, data)


def _append_whole(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        before = os.fstat(fd).st_size
        try:
            written = _write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes; "
                                         "disk full?)")
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):  # take back a partial row
                os.ftruncate(fd, before)
            raise
    finally:
        os.close(fd)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _header(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh), None) or list(COLUMNS)


def whole_rows_end(data: bytes) -> int:
    """Byte offset where the whole rows of a results CSV's bytes end: past the last record that
    is complete (a newline outside quotes ends it) and not shorter than the header.

    A write cut off midway leaves a prefix of a row: no final newline, or, after a newline inside
    a quoted field, an open quote; either way fewer fields than the header. A row with more
    fields is not a torn write and stays for the reader to report, and so does a file that is not
    a results CSV (its header names no case_id and provider): ``len(data)`` then.
    """
    first = data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")
    if not first or not ({"case_id", "provider"} <= set(first.split(","))
                         or (b"\n" not in data and ",".join(COLUMNS).startswith(first))):
        return len(data)  # not ours to cut (a torn header is a prefix of ours)
    ends = [0]
    quotes = pos = 0
    while (newline := data.find(b"\n", pos)) >= 0:
        quotes += data.count(b'"', pos, newline + 1)
        pos = newline + 1
        if quotes % 2 == 0:
            ends.append(pos)
    if len(ends) < 2:
        return 0
    header = _field_count(data[:ends[1]])
    if len(ends) > 2 and _field_count(data[ends[-2]:ends[-1]]) < header:
        return ends[-2]
    return ends[-1]


def _field_count(record: bytes) -> int:
    try:
        parsed = list(csv.reader(io.StringIO(record.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error):
        return -1
    return len(parsed[0]) if len(parsed) == 1 else -1


def heal_results(path: Path) -> TornRowWarning | None:
    """Set aside a torn last row of a results CSV: its bytes move to ``<name>.torn-<time>`` beside
    it, and the file is truncated back to its last whole row. Returns the warning to show (naming
    both files), or None when the file ends in a whole row. Raises ResultsWriteError when the file
    cannot be changed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{path}: cannot be read: {_reason(exc)}") from None
    end = whole_rows_end(data)
    if end == len(data):
        return None
    aside = None
    try:  # the torn bytes are safe in their own file before the original is cut
        aside = _set_aside(path, data[end:])
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if aside is not None:  # the file was not cut: one copy of its torn row is enough
            aside.unlink(missing_ok=True)
        raise ResultsWriteError(f"{path}: its last row is cut off ({len(data) - end} bytes) and "
                                f"cannot be set aside: {_reason(exc)}") from None
    return TornRowWarning(f"{path}: its last row was cut off (a run stopped while writing it); "
                          f"its {len(data) - end} bytes were moved to {aside} and the file cut "
                          "back to its last whole row (a resumed run measures that case again)")


def _set_aside(path: Path, torn: bytes) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    aside, suffix = path.with_name(f"{path.name}.torn-{stamp}"), 1
    while True:
        try:
            with open(aside, "xb") as fh:  # never overwrite an earlier torn row
                fh.write(torn)
                fh.flush()
                os.fsync(fh.fileno())
            return aside
        except FileExistsError:
            suffix += 1
            aside = path.with_name(f"{path.name}.torn-{stamp}-{suffix}")


def read_results(path: Path) -> pd.DataFrame:
    """Read a results CSV (or the one inside a run directory) into a DataFrame.

    A torn last row is set aside first (`heal_results`, with a TornRowWarning); when the file
    cannot be changed, its whole rows are read and the file is left as it is.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    source: Path | io.BytesIO = path
    try:
        torn = heal_results(path) if path.is_file() else None
    except ResultsWriteError as exc:
        torn = TornRowWarning(f"{exc}; reading its whole rows only")
        data = path.read_bytes()
        source = io.BytesIO(data[:whole_rows_end(data)])
    if torn is not None:
        warnings.warn(torn, stacklevel=2)
    _check_header(path, source)
    with warnings.catch_warnings():
        # Rows longer than the header: pandas would take the first column as the index and
        # shift every value one column left; with index_col=False it drops the extra fields.
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            frame = pd.read_csv(source, dtype={c: str for c in TEXT_COLUMNS},
                                keep_default_na=False, na_values=NA_VALUES, index_col=False)
        except pd.errors.ParserWarning:
            raise BadInputError(f"{path}: its rows have more fields than its header") from None
    for column, value in LATER_COLUMNS.items():
        frame[column] = frame[column].fillna(value) if column in frame.columns else value
    return frame


def _check_header(path: Path, source: Path | io.BytesIO) -> None:
    """Refuse a header that names a column twice: pandas would read the second as "ms.1" and
    every reader would take the first one's values without a word."""
    try:
        if isinstance(source, io.BytesIO):
            first = source.getvalue().split(b"\n", 1)[0]
        else:
            with open(source, "rb") as fh:
                first = fh.readline()
    except OSError:
        return  # the reader itself reports a file it cannot open
    header = next(csv.reader([first.decode("utf-8-sig", errors="replace")]), [])
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise BadInputError(f"{path}: column{'s' * (len(twice) > 1)} {', '.join(twice)} "
                            "appear" + "s" * (len(twice) == 1) + " more than once in its header")


def check_out_dir(out: Path, flag: str = "--out", given: Path | None = None) -> None:
    """Raise BadInputError naming ``out`` (or ``given``, the flag's value, when ``out`` is the
    directory it names a file in) when a directory cannot be made or written there: it, or its
    nearest existing parent, is a file or not writable."""
    probe = Path(out)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    shown = Path(given) if given is not None else Path(out)
    what = "" if probe == shown else f"{probe} "
    if probe.exists() and not probe.is_dir():
        raise BadInputError(f"{flag} {shown}: {what}is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInputError(f"{flag} {shown}: {what}is not writable")


def rewrite_results(path: Path, update: Callable[[list[dict[str, str]]], bool]) -> bool:
    """Let ``update`` change the rows of a results CSV in place (cells as the text written, the
    file's own columns kept); when it returns True, the file is replaced atomically by the new
    rows (a temporary file beside it, fsynced, renamed over it), so a crash leaves the old file or
    the new one, whole. A file whose last row is torn is left alone (its next reader heals it).
    Returns whether the file was replaced; ResultsWriteError names the file when it cannot be."""
    path = Path(path)
    tmp = path.with_name(path.name + ".rewrite")
    if not path.is_file():
        return False  # a run that wrote no row yet
    try:
        data = path.read_bytes()
        if whole_rows_end(data) != len(data):
            return False
        reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
        rows = list(reader)
        if not update(rows):
            return False
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=reader.fieldnames or list(COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except UnicodeDecodeError:
        return False  # not a results CSV this module wrote: not ours to rewrite
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ResultsWriteError(f"{path}: cannot rewrite: {_reason(exc)} (the file is as it "
                                "was)") from None
    return True


def write_meta(run_dir: Path, meta: dict) -> None:
    """Replace meta.json atomically (a temporary file renamed over it); ResultsWriteError names
    the file when it cannot be written."""
    tmp = run_dir / (META_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        # On disk before the rename: a crash must not leave an empty meta.json (its spec, and
        # with it `--resume DIR`, lost) in place of the old one.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(run_dir / META_FILE)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ResultsWriteError(f"{run_dir / META_FILE}: cannot write: {_reason(exc)}") from None


def read_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def held_runs(path: Path) -> str | None:
    """``holds N run directories (a, b, ...)`` for a directory whose subdirectories hold
    results.csv (given where one run was wanted), else None."""
    runs = sorted(p.name for p in Path(path).iterdir() if (p / RESULTS_FILE).is_file())
    if not runs:
        return None
    listed = ", ".join(runs[:3]) + (", ..." if len(runs) > 3 else "")
    return f"holds {len(runs)} run director{'ies' if len(runs) > 1 else 'y'} ({listed})"


# What a run records under a meta.json key, by the JSON type it writes there.
_META_KINDS = {dict: "an object", list: "a list of strings", str: "a string"}


def meta_object(run_dir: Path) -> dict:
    """A run's meta.json (``{}`` when there is none) as the object a run writes; BadInputError
    naming the file when it cannot be read (a directory, not UTF-8, not JSON) or is not one."""
    path = Path(run_dir) / META_FILE
    try:
        meta = read_meta(run_dir)
    except OSError as exc:  # a directory, no permission
        raise BadInputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise BadInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise BadInputError(f"{path}: holds a JSON {type(meta).__name__}, not the object "
                            "`dkbench run` writes")
    return meta


def meta_value(meta: dict, key: str, kind: type, path: Path) -> object:
    """``meta[key]`` (None when absent or null); BadInputError naming ``path`` and the key unless
    it is of the JSON type a run records there: ``kind`` dict, list (of strings) or str."""
    value = meta.get(key)
    if value is None or (isinstance(value, kind) and (
            kind is not list or all(isinstance(v, str) for v in value))):
        return value
    raise BadInputError(f"{path}: key {key!r} holds {json.dumps(value)}; allowed: null or "
                        f"{_META_KINDS[kind]}, as a run records it")


def done_keys(rows: Iterable[dict]) -> set[tuple[str, str]]:
    """(case_id, provider) pairs already present, for --resume."""
    return {(str(r["case_id"]), str(r["provider"])) for r in rows}
