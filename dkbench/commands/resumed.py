"""What `dkbench run --resume DIR` reads back from the run it finishes: the flags its meta.json
records, checked as a run writes them, and the refusals of flags that would do nothing."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import BadInputError, SpecError, one_line
from ..results.runs import REQUIRED_COLUMNS
from ..results.schema import (
    META_FILE,
    RESULTS_FILE,
    meta_object,
    meta_value,
    read_results,
    whole_rows_end,
)
from ..spec.sweep import parse_only


def check_resume_out(resume: Path, out: Path | None) -> None:
    """--out with --resume: a resumed run writes into its own directory, so an --out elsewhere
    would do nothing; it is refused rather than ignored."""
    if Path(resume).is_file():  # e.g. the run's results.csv, given for its directory
        hint = (f" (--resume {Path(resume).parent})"
                if Path(resume).name in (META_FILE, RESULTS_FILE) else "")
        raise BadInputError(f"--resume {resume}: is a file; give the run directory that holds "
                            f"{META_FILE} and {RESULTS_FILE}{hint}")
    if not any((resume / name).exists() for name in (META_FILE, RESULTS_FILE)):
        return  # not a run directory: --resume's own check says so
    if out is not None and Path(out).resolve() != Path(resume).resolve().parent:
        raise BadInputError(f"--out {out}: a resumed run writes into the directory it finishes "
                            f"(--resume {resume}), not under --out; drop --out")


def recorded_flags(resume: Path, providers: str | None, only: list[str] | None,
                    shard: str | None) -> tuple[str | None, list[str] | None, str | None]:
    """--providers, --only and --shard as recorded in a resumed run's meta.json, where not given,
    so that `--resume DIR` alone finishes the run it names."""
    meta = _resumed_meta(resume)
    recorded_providers = _recorded(resume, meta, "providers", list)
    recorded_only = _recorded(resume, meta, "only", list)
    recorded_shard = _recorded(resume, meta, "shard", str)
    if providers is None and recorded_providers:
        providers = ",".join(recorded_providers)
    if not only and recorded_only:
        _check_recorded_only(resume, recorded_only)
    return providers, only or list(recorded_only or []) or None, shard or recorded_shard


def _check_recorded_only(resume: Path, recorded: list[str]) -> None:
    """Refuse a recorded --only that this dkbench's rules no longer take (an older one wrote
    it), naming meta.json and its key: the user gave no --only to blame."""
    try:
        parse_only(recorded)
    except SpecError as exc:
        raise BadInputError(
            f"--resume {resume}: {resume / META_FILE}: key 'only' holds {json.dumps(recorded)}, "
            f"which is not valid for this dkbench (an older one recorded it): the recorded "
            f"{exc}; pass --only explicitly to replace it, or start a fresh run "
            f"(dkbench run SPEC)") from None


def recorded_scope(resume: Path, chosen: list[str], only: list[str] | None) -> dict:
    """meta.json's providers and only once a resume with ``chosen`` and ``only`` has run: what
    the run covers, widened by the resume but never narrowed by it. A resume of some providers
    or cases only finishes those; recording just them would have a later `--resume DIR` call
    the run done with the others' rows still missing."""
    meta = _resumed_meta(resume)
    recorded = _recorded(resume, meta, "providers", list) or []
    providers = list(dict.fromkeys([*recorded, *chosen]))
    scope = {"providers": providers,
             "only": widened_only(_recorded(resume, meta, "only", list) or [], list(only or []))}
    if isinstance(meta.get("baseline"), str):  # a resume without it leaves it the run's baseline
        scope["baseline"] = meta["baseline"]
    return scope


def widened_only(recorded: list[str], given: list[str]) -> list[str]:
    """The narrowest --only that keeps the cases of both: a key both name, with the values of
    both (a key given twice takes both its values); a key one of them leaves open stays open.
    No --only (the whole sweep) in either is no --only."""
    try:
        old, new = parse_only(recorded), parse_only(given)
    except SpecError:  # a hand-edited meta.json: the whole sweep is the safe side
        return []
    return [item for key in old if key in new
            for item in dict.fromkeys([*old[key][0], *new[key][0]])]


def check_resumed_meta(resume: Path) -> None:
    """Refuse a meta.json that cannot be read (not JSON, say, after a crash of the machine), with
    the way to finish the run anyway; before anything else reads it."""
    _resumed_meta(resume)


def _resumed_meta(resume: Path) -> dict:
    try:
        return meta_object(resume)
    except BadInputError as exc:
        raise BadInputError(f"--resume {resume}: {exc}; to finish the run without it, move it "
                            f"aside and give the SPEC the run ran (dkbench run SPEC --resume "
                            f"{resume})") from None


def _recorded(resume: Path, meta: dict, key: str, kind: type):
    """``meta[key]`` as a run records it (None when absent); refused naming the file and key."""
    try:
        return meta_value(meta, key, kind, resume / META_FILE)
    except BadInputError as exc:
        raise BadInputError(f"--resume {resume}: {exc}") from None


def check_resumed_shard(resume: Path, part) -> None:
    recorded = _recorded(resume, _resumed_meta(resume), "shard", str)
    given = str(part) if part is not None else None
    if recorded != given:
        raise BadInputError(f"--resume {resume}: that run is "
                            f"{f'shard {recorded}' if recorded else 'not sharded'}; give "
                            f"{f'--shard {recorded}' if recorded else 'no --shard'} to finish it")


# What a row's numbers depend on: a resumed run's new rows must be measured on what the old ones
# were, or one run directory (and every table drawn from it) mixes two machines in silence.
ENV_KEYS = ("gpu", "torch", "triton")


def check_resumed_environment(resume: Path, here: dict) -> None:
    """Refuse to finish a run recorded with another gpu, torch or triton than ``here`` (this
    process's `environment`); a key the run did not record is not compared."""
    env = _recorded(resume, _resumed_meta(resume), "environment", dict) or {}
    differ = [f"{key} {env[key]!r} (here: {here.get(key)!r})" for key in ENV_KEYS
              if env.get(key) not in (None, "") and env.get(key) != here.get(key)]
    if differ:
        raise BadInputError(f"--resume {resume}: that run ran with {', '.join(differ)}, as its "
                            f"{META_FILE} records; finish it with the same gpu, torch and triton, "
                            "or start a new run here and combine the two with `dkbench merge`")


def run_ids(resume: Path) -> list[str]:
    """The run_ids a run directory's rows may hold: the one its meta.json records, those of
    earlier resumes and merge inputs (its ``run_ids``, ``merged_from``), and the directory's name
    (a resumed run's rows take it, so a renamed or copied run still resumes)."""
    meta = _resumed_meta(resume)
    sources = meta.get("merged_from") if isinstance(meta.get("merged_from"), list) else []
    earlier = meta.get("run_ids") if isinstance(meta.get("run_ids"), list) else []
    found = [meta.get("run_id"), *earlier, *(s.get("run_id") for s in sources
                                            if isinstance(s, dict)), resume.resolve().name]
    return sorted({r for r in found if isinstance(r, str) and r})


def check_resumed_rows(resume: Path, case_ids: set[str], spec: object) -> None:
    """Refuse a results.csv a resumed run would mix into itself (the file read once for both):
    rows of another run (not among `run_ids`), which would count as done, so their cases would
    never be measured in this one; and rows of no case of the spec resumed (``case_ids``, before
    --only and --shard): rows of another spec, which a run without meta.json cannot tell apart
    by its recorded spec."""
    csv_path = resume / RESULTS_FILE
    if not csv_path.is_file() or not csv_path.stat().st_size:
        return  # no rows yet
    frame = read_results(resume)
    recorded = _resumed_meta(resume).get("run_id")
    if isinstance(recorded, str) and "run_id" in frame.columns:
        allowed = set(run_ids(resume))
        for number, run_id in enumerate(frame["run_id"], start=1):
            if run_id not in allowed:
                raise BadInputError(
                    f"--resume {resume}: {csv_path} row {number} is of run {run_id!r}, not of "
                    f"this run ({recorded!r}, as {META_FILE} records); a run directory holds its "
                    "own rows only: move the others out, or combine runs with `dkbench merge`")
    for number, (case_id, provider) in enumerate(zip(frame["case_id"], frame["provider"]),
                                                 start=1):
        if str(case_id) not in case_ids:
            raise BadInputError(
                f"--resume {resume}: {csv_path} row {number} (case_id {case_id}, provider "
                f"{provider}) is of no case of {spec}: that run is of another spec (or an edited "
                "one); resume it with the SPEC it ran, or start a new run")


def check_resumed_results(resume: Path) -> None:
    """Refuse a results.csv a resumed run cannot add to: not UTF-8, not a CSV, a row with more
    fields than its header, or a header without the columns every reader needs (a resumed run
    writes only the file's own columns, so its measurements would be dropped in silence). A torn
    last row is not looked at: the run sets it aside."""
    csv_path = resume / RESULTS_FILE
    if not csv_path.is_file():
        return  # none yet, or the run's own checks name what it is
    try:
        data = csv_path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"--resume {resume}: {csv_path}: cannot be read "
                            f"({exc.strerror or exc})") from None
    data = data[:whole_rows_end(data)]
    if not data:
        return  # empty, or a torn header: every case runs
    try:
        records = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    except UnicodeDecodeError as exc:
        raise BadInputError(f"--resume {resume}: {csv_path}: not a UTF-8 CSV ({exc}); allowed: "
                            "the results.csv `dkbench run` writes") from None
    except csv.Error as exc:
        raise BadInputError(f"--resume {resume}: {csv_path}: not a readable CSV ({one_line(exc)})") from None
    header = records[0] if records else []
    missing = [c for c in ("case_id", *REQUIRED_COLUMNS) if c not in header]
    if missing:
        raise BadInputError(f"--resume {resume}: {csv_path}: its header lacks the column"
                            f"{'s' * (len(missing) > 1)} {', '.join(missing)}; a resumed run "
                            "writes only the file's own columns, so it adds to a results.csv "
                            "of `dkbench run` only")
    for line, record in enumerate(records[1:], start=2):
        if len(record) > len(header):
            raise BadInputError(f"--resume {resume}: {csv_path}: line {line} has more fields "
                                f"({len(record)}) than its header ({len(header)})")
