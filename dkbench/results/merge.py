"""Combine the run directories of one sweep's shards (`dkbench merge`) into one run directory.

Rows are copied as text (never re-parsed and re-formatted), keyed by (case_id, provider). Inputs
must come from the same spec and the same environment (GPU, torch, triton) and hold no row twice;
`force` merges anyway, the last input's row winning a duplicate. Cases of the spec with no row
(a shard not run yet) are reported, not refused: `dkbench run SPEC --resume OUT` fills them in.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..errors import BadInputError, ResultsWriteError, one_line
from ..spec.load import sweep_from_dict
from ..spec.sweep import expand, filter_cases
from .check import check_values
from .runs import REQUIRED_COLUMNS
from .schema import (
    META_FILE,
    RESULTS_FILE,
    check_out_dir,
    heal_results,
    held_runs,
    meta_object,
    meta_value,
    whole_rows_end,
    write_meta,
)

ENV_KEYS = ("gpu", "torch", "triton")
_SHARD = re.compile(r"[1-9][0-9]*/[1-9][0-9]*")
# meta.json keys that describe one process's run, not the merged whole.
PER_RUN_KEYS = ("workers", "worker_environments", "worker_warnings", "gpus", "finished")


@dataclass
class Source:
    run_dir: Path
    meta: dict
    header: list[str]
    rows: list[dict[str, str]]
    notes: list[str] = field(default_factory=list)  # e.g. a torn last row set aside


@dataclass
class MergeResult:
    out: Path
    rows: int
    sources: int
    shards: list[str]
    replaced: int = 0  # duplicate rows dropped in favour of a later input (--force)
    expected_cases: int | None = None
    missing_cases: int = 0
    notes: list[str] = field(default_factory=list)  # warnings for the user


def _load(run_dir: Path) -> Source:
    meta_path, csv_path = run_dir / META_FILE, run_dir / RESULTS_FILE
    if not meta_path.is_file() or not csv_path.is_file():
        raise BadInputError(f"{run_dir}: {_not_a_run(run_dir)}")
    meta = meta_object(run_dir)
    if meta.get("kind", "run") != "run" or "spec" not in meta:
        raise BadInputError(f"{run_dir}: not a `dkbench run` directory (its meta.json is of kind "
                            f"{meta.get('kind')!r}{'' if 'spec' in meta else ', with no spec'})")
    for key, kind in (("spec", dict), ("environment", dict), ("only", list), ("providers", list),
                      ("shard", str), ("started", str), ("finished", str)):
        meta_value(meta, key, kind, meta_path)
    if meta.get("shard") is not None and not _SHARD.fullmatch(meta["shard"]):
        raise BadInputError(f"{meta_path}: key 'shard' holds {meta['shard']!r}; allowed: I/N "
                            "(as `dkbench run --shard` records it), or null")
    data, notes = csv_path.read_bytes(), []
    end = whole_rows_end(data)
    if end < len(data):  # a run stopped mid-row: never copy half a row
        try:
            notes.append(str(heal_results(csv_path)))
        except ResultsWriteError as exc:
            notes.append(f"{exc}; merging its whole rows only")
        data = data[:end]
    try:  # utf-8-sig: a byte-order mark (an editor's) must not become part of a column name
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
        header = list(reader.fieldnames or [])
        rows = list(reader)
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{csv_path}: not a UTF-8 CSV ({exc})") from None
    except csv.Error as exc:
        raise BadInputError(f"{csv_path}: not a readable CSV ({one_line(exc)})") from None
    if header and not {"case_id", "provider"} <= set(header):
        raise BadInputError(f"{csv_path}: no case_id/provider columns")
    lacks = [c for c in REQUIRED_COLUMNS if header and c not in header]
    if lacks:  # copied as they are, the merged rows would be as unreadable
        raise BadInputError(f"{csv_path}: its header lacks the column{'s' * (len(lacks) > 1)} "
                            f"{', '.join(lacks)}, which plot, gate, report and --resume read; "
                            "allowed: the results.csv of `dkbench run`")
    if len(set(header)) < len(header):
        twice = sorted({c for c in header if header.count(c) > 1})
        raise BadInputError(f"{csv_path}: column {', '.join(twice)} appears more than once in "
                            "its header")
    for line, row in enumerate(rows, start=2):
        if None in row:
            raise BadInputError(f"{csv_path}: line {line} has more fields than the header")
    if rows:
        check_values(pd.DataFrame(rows, columns=header), csv_path)
    return Source(run_dir, meta, header, rows, notes)


def _not_a_run(path: Path) -> str:
    """Why ``path`` is not a run directory to merge."""
    if not path.exists():
        return "no such directory"
    if not path.is_dir():
        return f"is a file; give a run directory (holding {META_FILE} and {RESULTS_FILE})"
    runs = held_runs(path)
    if runs is not None and not (path / RESULTS_FILE).exists():
        return f"{runs}; give each of them as a RUN_DIR"
    lacks = [name for name in (META_FILE, RESULTS_FILE) if not (path / name).is_file()]
    return f"not a run directory (it has no {' and no '.join(lacks)})"


def _spec_key(meta: dict) -> object:
    """The spec as compared across machines: file patterns by file name, not absolute path."""
    spec = dict(meta.get("spec") or {})
    patterns = spec.get("patterns")
    if isinstance(patterns, list):
        spec["patterns"] = [{**p, "path": Path(p["path"]).name}
                            if isinstance(p, dict) and isinstance(p.get("path"), str) else p
                            for p in patterns]
    return (meta.get("spec_name"), spec)


def _spec_difference(meta: dict, other: dict) -> str:
    """What tells two runs' specs apart: their names, or the keys whose values differ (a spec
    loaded by another version of dkbench may differ in a default, such as check.rtol)."""
    name, spec = _spec_key(meta)
    other_name, other_spec = _spec_key(other)
    if name != other_name:
        return f"{name!r} vs {other_name!r}"
    keys = sorted(k for k in set(spec) | set(other_spec) if spec.get(k) != other_spec.get(k))
    return f"both {name!r}; they differ in {', '.join(keys)}"


def _differences(sources: list[Source]) -> list[str]:
    first = sources[0]
    problems = []
    for src in sources[1:]:
        if _spec_key(src.meta) != _spec_key(first.meta):
            problems.append(f"{src.run_dir} is a run of a different spec than {first.run_dir} "
                            f"({_spec_difference(src.meta, first.meta)})")
        env, env0 = src.meta.get("environment") or {}, first.meta.get("environment") or {}
        for key in ENV_KEYS:
            if env.get(key) != env0.get(key):
                problems.append(f"{src.run_dir} ran with {key} {env.get(key)!r}, {first.run_dir} "
                                f"with {env0.get(key)!r}")
        problems += _split_differences(src, first)
        if src.header and first.header and src.header != first.header:
            lacks = [c for c in first.header if c not in src.header]
            adds = [c for c in src.header if c not in first.header]
            what = "; ".join(part for part in (
                f"without {', '.join(lacks)}" if lacks else "",
                f"with {', '.join(adds)} besides" if adds else "") if part) or "in another order"
            problems.append(f"{src.run_dir} has other results.csv columns than {first.run_dir} "
                            f"({what}: written by another version of dkbench?)")
    return problems + _shards_twice(sources)


def _split_differences(src: Source, first: Source) -> list[str]:
    """Flags that decide which rows a shard holds: shards of another count or --only split
    another list of cases (so they may overlap or leave gaps), and other --providers make the
    merged meta.json's providers wrong for a later --resume."""
    problems = []
    shard, shard0 = src.meta.get("shard"), first.meta.get("shard")
    count, count0 = (s.split("/")[1] if s else None for s in (shard, shard0))
    if count != count0:
        problems.append(f"{src.run_dir} is {f'shard {shard}' if shard else 'not sharded'}, "
                        f"{first.run_dir} {f'shard {shard0}' if shard0 else 'not sharded'}: "
                        "they split the cases differently")
    for key, flag in (("only", "--only"), ("providers", "--providers")):
        value, value0 = src.meta.get(key) or [], first.meta.get(key) or []
        if value != value0:
            problems.append(f"{src.run_dir} ran with {flag} {' '.join(map(str, value)) or '(none)'}"
                            f", {first.run_dir} with {' '.join(map(str, value0)) or '(none)'}")
    return problems


def _shards_twice(sources: list[Source]) -> list[str]:
    """A shard given in two run directories (run twice, or a copy): their rows may differ or
    overlap, and the merge would keep whichever came last."""
    by_shard: dict[str, list[Path]] = {}
    for src in sources:
        if src.meta.get("shard"):
            by_shard.setdefault(src.meta["shard"], []).append(src.run_dir)
    return [f"shard {shard} is given {len(dirs)} times ({', '.join(map(str, dirs))})"
            for shard, dirs in by_shard.items() if len(dirs) > 1]


def _expected_cases(sources: list[Source]) -> set[str]:
    """case_ids the spec (after the inputs' shared --only) expands to."""
    sweep = sweep_from_dict(sources[0].meta["spec"], sources[0].run_dir / "meta.json")
    onlys = {tuple(s.meta.get("only") or ()) for s in sources}
    cases = expand(sweep)
    if len(onlys) == 1:
        cases = filter_cases(cases, list(onlys.pop()))
    return {c.case_id for c in cases}


def _shard_notes(shards: list[str | None]) -> list[str]:
    given = [s for s in shards if s]
    counts = {int(s.split("/")[1]) for s in given}
    if not given or len(counts) != 1:
        return []
    count = counts.pop()
    absent = [f"{i}/{count}" for i in range(1, count + 1) if f"{i}/{count}" not in given]
    return [f"shards not among the inputs: {', '.join(absent)}"] if absent else []


def merge_runs(run_dirs: list[Path], out: Path, force: bool = False) -> MergeResult:
    """Write ``out/results.csv`` (every input row) and ``out/meta.json`` (sources and shards)."""
    if not run_dirs:
        raise BadInputError("give at least one RUN_DIR to merge")
    run_dirs = [Path(d) for d in run_dirs]
    if len({d.resolve() for d in run_dirs}) != len(run_dirs):
        raise BadInputError("a RUN_DIR is given twice")
    if out.resolve() in {d.resolve() for d in run_dirs}:
        raise BadInputError(f"--out {out}: is one of the inputs; pick a new directory")
    check_out_dir(out)
    sources = [_load(d) for d in run_dirs]
    notes: list[str] = [note for s in sources for note in s.notes]
    if (out / RESULTS_FILE).exists() or (out / META_FILE).exists():
        if not force:
            raise BadInputError(f"--out {out}: already holds a run (--force overwrites it)")
        notes.append(f"--out {out} held a run: overwritten (--force)")
    problems = _differences(sources)
    if problems and not force:
        raise BadInputError("refusing to merge: " + "; ".join(problems)
                            + " (--force merges anyway)")
    notes += [f"{p} (merged anyway: --force)" for p in problems]

    header = list(dict.fromkeys(col for s in sources for col in s.header))
    if not header:  # a run stopped while writing its first row leaves an empty results.csv
        raise BadInputError("nothing to merge: the results.csv of every RUN_DIR is empty "
                            f"({', '.join(str(s.run_dir) for s in sources)})")
    merged: dict[tuple[str, str], dict[str, str]] = {}
    origin: dict[tuple[str, str], Path] = {}
    duplicates: list[str] = []
    for src in sources:
        for row in src.rows:
            key = (row["case_id"], row["provider"])
            if key in merged:
                duplicates.append(f"{key[0]}/{key[1]} in {origin[key]} and {src.run_dir}")
                del merged[key]  # the last one wins, and takes the last position
            merged[key], origin[key] = row, src.run_dir
    if duplicates and not force:
        raise BadInputError(f"{len(duplicates)} (case_id, provider) rows appear in more than one "
                            f"place, e.g. {duplicates[0]} (--force keeps the last one)")
    if duplicates:
        notes.append(f"{len(duplicates)} duplicate rows: kept the one from the last input given "
                     f"(e.g. {duplicates[0]})")

    shards = [s.meta.get("shard") for s in sources]
    result = MergeResult(out, len(merged), len(sources), sorted({s for s in shards if s}),
                         replaced=len(duplicates), notes=notes)
    try:
        expected = _expected_cases(sources)
    except Exception as exc:  # noqa: BLE001 - the check is advisory; the merge still stands
        notes.append(f"could not expand the spec to look for missing cases: {one_line(exc)}")
    else:
        present = {case_id for case_id, _ in merged}
        result.expected_cases, result.missing_cases = len(expected), len(expected - present)
        if result.missing_cases:
            notes.append(f"{result.missing_cases} of {len(expected)} cases of the spec have no row "
                         f"(finish with: dkbench run SPEC --resume {out})")
            notes += _shard_notes(shards)

    _write(out, header, list(merged.values()), _merged_meta(sources, out, result, problems))
    return result


def _merged_meta(sources: list[Source], out: Path, result: MergeResult, forced: list[str]) -> dict:
    meta = {k: v for k, v in sources[0].meta.items() if k not in PER_RUN_KEYS}
    finished = [s.meta.get("finished") for s in sources]
    starts = [s.meta["started"] for s in sources if s.meta.get("started")]
    meta.update(
        run_id=out.name, shard=None, shards=result.shards,
        merged=datetime.now(timezone.utc).isoformat(),
        merged_from=[{"run_dir": str(s.run_dir), "run_id": s.meta.get("run_id"),
                      "shard": s.meta.get("shard"), "rows": len(s.rows),
                      "gpu": (s.meta.get("environment") or {}).get("gpu"),
                      "finished": s.meta.get("finished")} for s in sources],
        missing_cases=result.missing_cases, duplicates_replaced=result.replaced,
        forced=forced,
        # Every run_id its rows hold: a later --resume refuses rows of any other run.
        run_ids=sorted({out.name, *(r.get("run_id") or "" for s in sources for r in s.rows)}
                       - {""}))
    providers = [p for s in sources for p in s.meta.get("providers") or []]
    if providers:  # those of every input (they differ only under --force)
        meta["providers"] = list(dict.fromkeys(providers))
    if starts:
        meta["started"] = min(starts)
    if all(finished):
        meta["finished"] = max(finished)
    return meta


def _write(out: Path, header: list[str], rows: list[dict[str, str]], meta: dict) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=header, restval="", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = out / (RESULTS_FILE + ".tmp")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text.getvalue(), newline="")
        # A run overwritten (--force) loses its meta.json before its rows: a merge stopped
        # between the two files leaves rows that no meta.json describes (not a run, and
        # refused as one), never the new rows under the old run's sources and spec.
        (out / META_FILE).unlink(missing_ok=True)
        tmp.replace(out / RESULTS_FILE)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BadInputError(f"--out {out}: cannot write the merged run there "
                            f"({exc.strerror or exc})") from None
    write_meta(out, meta)
