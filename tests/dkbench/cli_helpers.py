"""Running the CLI in-process and reading what it wrote, shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result

from dkbench.cli import app
from dkbench.results.schema import read_results


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    # Wide enough that rich never folds a message or table cell the assertions look for.
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", **(env or {})})


def flat(text: str) -> str:
    return " ".join(text.split())


def run_dir_of(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def pairs(run_dir: Path) -> list[tuple[str, str]]:
    """(case_id, provider) of every row, in file order."""
    frame = read_results(run_dir)
    return list(zip(frame["case_id"], frame["provider"]))


def run_to_end(spec: Path, out: Path, *flags: object) -> Path:
    """`dkbench run SPEC --out OUT -q FLAGS...` to completion; its run directory."""
    result = invoke("run", spec, "--out", out, "-q", *flags)
    assert result.exit_code == 0, result.output
    return run_dir_of(out)
