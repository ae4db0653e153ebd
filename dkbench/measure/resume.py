"""Resuming a run (`dkbench run --resume DIR`): the run directory checked writable and of the same
spec, the rows it has done, its recorded spec, and the baseline medians it already measured."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BadInputError
from ..results.schema import (
    META_FILE,
    RESULTS_FILE,
    heal_results,
    read_meta,
    read_results,
)
from ..spec.load import check_sweep, sweep_from_dict
from ..spec.sweep import Sweep


def resumed_rows(sweep: Sweep, resume: Path) -> tuple[set[tuple[str, str]], list[str]]:
    """The (case_id, provider) pairs the run ``resume`` has done, and notes for the user (a torn
    last row set aside: its case runs again); the run is checked writable and of ``sweep``'s spec
    first."""
    meta = _resumable_meta(resume)
    if meta.get("spec_name") not in (None, sweep.name):
        raise BadInputError(f"--resume {resume}: that run is of spec {meta.get('spec_name')!r}, "
                            f"not {sweep.name!r}")
    differ = spec_differences(meta.get("spec"), sweep)
    if differ:
        raise BadInputError(f"--resume {resume}: the SPEC given differs from the one recorded in "
                            f"{resume / META_FILE} in {', '.join(differ)}; give no SPEC to finish "
                            "the run as recorded")
    csv_path = resume / RESULTS_FILE
    done: set[tuple[str, str]] = set()
    notes: list[str] = []
    if csv_path.exists() and csv_path.stat().st_size:
        torn = heal_results(csv_path)
        if torn is not None:
            notes.append(str(torn))
        if csv_path.stat().st_size:  # a torn header leaves nothing: every case runs
            frame = read_results(resume)
            done = {(str(c), str(p)) for c, p in zip(frame["case_id"], frame["provider"])}
    return done, notes


def _resumable_meta(resume: Path) -> dict:
    """meta.json of a run directory that --resume can write to; BadInputError names the file."""
    if not (resume / RESULTS_FILE).exists() and not (resume / META_FILE).exists():
        raise BadInputError(f"--resume {resume}: not a run directory (no results.csv or meta.json)")
    for path, mode in ((resume, os.W_OK | os.X_OK), (resume / RESULTS_FILE, os.W_OK),
                       (resume / META_FILE, os.W_OK)):
        if path.exists() and not os.access(path, mode):
            raise BadInputError(f"--resume {resume}: {path} is read-only; make it writable to "
                                "finish the run")
    try:
        meta = read_meta(resume)
    except (ValueError, OSError) as exc:
        raise BadInputError(f"--resume {resume}: {resume / META_FILE} cannot be read ({exc})") \
            from None
    return meta if isinstance(meta, dict) else {}


def recorded_spec(resume: Path) -> tuple[Sweep, str]:
    """The sweep recorded in a run's meta.json and its YAML text, for --resume without a SPEC."""
    meta = _resumable_meta(resume)
    path = resume / META_FILE
    if not isinstance(meta.get("spec"), dict):
        raise BadInputError(f"--resume {resume}: {path} records no spec; give the SPEC it ran")
    sweep = sweep_from_dict(meta["spec"], f"{path} (its recorded spec)")
    check_sweep(sweep, path)
    return sweep, str(meta.get("spec_text") or "")


def spec_differences(recorded: object, sweep: Sweep) -> list[str]:
    """Top-level keys in which ``sweep`` differs from a run's recorded spec (none when the run
    recorded none). Pattern files compare by name, so a moved checkout still resumes."""
    if not isinstance(recorded, dict):
        return []
    try:  # through the model again, so defaults added since the run was recorded match
        recorded = Sweep.model_validate(recorded).model_dump(mode="json")
    except ValueError:
        pass
    given = sweep.model_dump(mode="json")
    for spec in (recorded, given):
        spec["patterns"] = [{**p, "path": Path(p["path"]).name}
                            if isinstance(p, dict) and p.get("path") else p
                            for p in spec.get("patterns") or []]
    return sorted(k for k in set(recorded) | set(given) if recorded.get(k) != given.get(k))


def previous_baselines(run_dir: Path, baseline: str | None) -> dict[str, float]:
    """Baseline medians already measured in a resumed run, so new rows still get speedups."""
    path = run_dir / RESULTS_FILE
    if baseline is None or not path.exists() or not path.stat().st_size:
        return {}
    frame = read_results(run_dir)
    ok = frame[(frame["provider"] == baseline) & (frame["status"] == "ok")]
    return {str(c): float(ms) for c, ms in zip(ok["case_id"], ok["ms"])}
