"""What `dkbench run --resume DIR` reads back from the run it finishes: the flags its meta.json
records, checked as a run writes them, and the refusals of flags that would do nothing."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError
from ..results.schema import META_FILE, RESULTS_FILE, meta_object, meta_value


def check_resume_out(resume: Path, out: Path | None) -> None:
    """--out with --resume: a resumed run writes into its own directory, so an --out elsewhere
    would do nothing; it is refused rather than ignored."""
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
    return providers, only or list(recorded_only or []) or None, shard or recorded_shard


def _resumed_meta(resume: Path) -> dict:
    try:
        return meta_object(resume)
    except BadInputError as exc:
        raise BadInputError(f"--resume {resume}: {exc}") from None


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
