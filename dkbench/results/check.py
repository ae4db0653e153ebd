"""The values of a results table, checked once for every reader (gate, plot, report, merge).

A results.csv is written by `dkbench run` but read back from disk, where an edit, a bad merge or
another tool may have left text in a number column, a negative time or a status nobody knows. A
reader that took such a cell as NaN would drop the row in silence (a gate then compares fewer rows
and passes), so each reader calls `check_values` first and gets one `BadInputError` naming the
file, the row, the column and what is allowed.

The column kinds come from `ResultRow`'s field types, so a column added there is checked too.
Columns a file lacks are not checked here (each reader asks for the ones it needs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import BadInputError
from .schema import STATUSES, ResultRow

NUMBER_COLUMNS = tuple(f.name for f in fields(ResultRow) if f.type == "float")
INTEGER_COLUMNS = tuple(f.name for f in fields(ResultRow) if f.type == "int")
BOOL_COLUMNS = tuple(f.name for f in fields(ResultRow) if f.type == "bool")
# The timing and throughput of a row with status ok: a finite number above zero where given, and
# `ms` always given (it is what the row measured).
POSITIVE_COLUMNS = ("ms", "ms_p20", "ms_p80", "tflops", "dense_tflops", "speedup", "speedup_p20",
                    "speedup_p80")
# Sizes of a case: at least 1 where given (page_size may be 0, a seed anything).
SIZE_COLUMNS = ("batch", "seqlen", "q_len", "heads", "kv_heads", "head_dim", "block_size")
_MISSING = ("", "nan", "NaN")
_BOOLS = ("true", "false", "1", "0")


def _text(values: pd.Series) -> pd.Series:
    return values.astype(object).where(values.notna(), "").astype(str).str.strip()


def _numbers(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(the cells as floats, NaN where missing; which cells hold text that is not a number)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.astype(float), pd.Series(False, index=values.index)
    text = _text(values)
    missing = text.isin(_MISSING)
    parsed = pd.to_numeric(text.where(~missing), errors="coerce")
    return parsed, ~missing & parsed.isna()


def _show(value: object) -> str:
    if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)):
        return "is empty" if math.isnan(value) else f"holds {float(value):g}"
    return "is empty" if str(value).strip() in _MISSING else f"holds {str(value)!r}"


def _name(value: object) -> str:
    """A name as written, or quoted where it holds a newline or another unprintable character,
    so that the error stays one line."""
    text = str(value)
    return text if text.isprintable() else repr(text)


def _where(frame: pd.DataFrame, index) -> str:
    row = frame.loc[index]
    number = frame.index.get_loc(index) + 1
    what = ", ".join(f"{name} {_name(row[name])}" for name in ("case_id", "provider")
                     if name in frame.columns and str(row[name]).strip())
    return f"row {number}" + (f" ({what})" if what else "")


@dataclass(frozen=True)
class _Kinds:
    """What a table's columns may hold."""

    statuses: tuple[str, ...]
    numbers: tuple[str, ...]
    integers: dict[str, float]  # column -> its least value
    bools: tuple[str, ...]
    positive: tuple[str, ...]  # in a row with status ok; the first one always given


RESULTS = _Kinds(
    STATUSES, NUMBER_COLUMNS,
    {c: 1 if c in SIZE_COLUMNS else 0 if c == "page_size" else -math.inf for c in INTEGER_COLUMNS},
    BOOL_COLUMNS, POSITIVE_COLUMNS)
# tune.csv (`dkbench tune`): a candidate the screen dropped is "screened"; its launch config's
# numbers are whole numbers of at least 1.
TUNE = _Kinds(
    (*STATUSES, "screened"), ("ms", "ms_p20", "ms_p80", "speedup_vs_default", "speedup_p20",
                              "speedup_p80", "screen_speedup"),
    {c: 1 for c in ("block_m", "block_n", "num_warps", "num_stages", "seqlen", "heads",
                    "kv_heads", "head_dim", "block_size")},
    ("is_best",), ("ms", "ms_p20", "ms_p80"))


def _problems(frame: pd.DataFrame, kinds: _Kinds) -> list[tuple[object, str]]:
    """(row index, what is wrong with it) for every bad cell, column by column."""
    found: list[tuple[object, str]] = []

    def add(mask: pd.Series, column: str, allowed: str) -> None:
        for index in mask[mask].index:
            found.append((index, f"column {column} {_show(frame.at[index, column])}; "
                                 f"allowed: {allowed}"))

    status = None
    if "status" in frame.columns:
        status = _text(frame["status"]).str.lower()
        add(~status.isin(kinds.statuses), "status", ", ".join(kinds.statuses))
    for column in (c for c in kinds.numbers if c in frame.columns):
        _, text = _numbers(frame[column])
        add(text, column, "a number, or empty")
    for column, least in kinds.integers.items():
        if column not in frame.columns:
            continue
        parsed, text = _numbers(frame[column])
        whole = parsed.map(lambda v: math.isfinite(v) and float(v).is_integer())
        bad = parsed.notna() & ~(whole & (parsed >= least))
        add(text | bad, column, "a whole number" + {1: " of at least 1", 0: ", 0 or more"}.get(
            least, ""))
    for column in (c for c in kinds.bools if c in frame.columns):
        text = _text(frame[column]).str.lower()
        add(~text.isin((*_BOOLS, "", "nan")), column, "True or False")
    if status is not None:
        ok = status == "ok"
        for column in (c for c in kinds.positive if c in frame.columns):
            parsed, text = _numbers(frame[column])
            always = column == kinds.positive[0]
            given = pd.Series(True, index=frame.index) if always else parsed.notna()
            bad = ok & ~text & given & ~(parsed.map(math.isfinite) & (parsed > 0))
            add(bad, column, "in a row with status ok, a finite number above 0"
                + (" (the row's measured time)" if always else ""))
    return found


def check_values(frame: pd.DataFrame, path: Path | str, label: str = "",
                 kinds: _Kinds = RESULTS) -> None:
    """Raise BadInputError naming ``path`` (after ``label``, e.g. "baseline") and the first bad
    cell of ``frame``, a results table as read from it (cells parsed or as text): a status not in
    `STATUSES`, text in a number column, a fraction or text in a whole-number column, a flag other
    than True/False, or an ok row whose timing is missing, not finite or not above 0. ``kinds``
    is `RESULTS` (results.csv) or `TUNE` (tune.csv)."""
    problems = _problems(frame, kinds)
    if not problems:
        return
    order = {index: i for i, index in enumerate(frame.index)}
    index, what = min(problems, key=lambda p: order[p[0]])
    more = len(problems) - 1
    tail = f" ({more} more bad cell{'s' * (more > 1)} in the file)" if more else ""
    head = f"{label} " if label else ""
    raise BadInputError(f"{head}{path}: {_where(frame, index)}: {what}{tail}")
