"""`dkbench run`, `gate` and `env` flags a hurried user could give: an empty path (a variable left
unset), a flag given twice, a fifo for --markdown, a provider name with a stray blank, a tolerance
with an underscore."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dkbench import launch, startup
from dkbench.errors import BadInputError
from dkbench.gate.compare import parse_tolerance

from .cli_helpers import flat, invoke
from .specs import write_spec
from .test_break_gate_merge import refused
from .test_gate import make_run, write_run


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    return write_run(tmp_path / "cur", make_run()), write_run(tmp_path / "base", make_run())


def test_run_out_empty_is_refused_not_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Path("") is ".": `--out "$OUT"` with OUT unset wrote the run into the working directory.
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    refused(invoke("run", write_spec(tmp_path), "--out", "", "-q"), "--out '': names no path")
    assert not list(here.iterdir())


def test_validate_of_an_empty_path_is_refused_naming_it() -> None:
    # Was: ".: is a directory", naming a path the user never gave.
    refused(invoke("validate", ""), "SPEC '': names no path; allowed: a spec file (YAML)")


@pytest.mark.parametrize("empty", ["current", "--baseline", "--markdown"])
def test_gate_empty_path_is_refused_naming_it(runs: tuple[Path, Path], empty: str) -> None:
    cur, base = runs
    args = {"current": ["", "--baseline", base],
            "--baseline": [cur, "--baseline", ""],
            "--markdown": [cur, "--baseline", base, "--markdown", ""]}[empty]
    refused(invoke("gate", *args), f"{empty.upper() if empty == 'current' else empty} '': "
                                   "names no path; allowed:")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no fifos here")
def test_gate_markdown_fifo_is_refused_before_reading(runs: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    # Writing the Markdown into a fifo nobody reads blocked the gate forever after its verdict.
    fifo = tmp_path / "gate.md"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that a write fails this, not hangs
    cur, base = runs
    try:
        text = refused(invoke("gate", cur, "--baseline", base, "--markdown", fifo),
                       f"--markdown {fifo}: is not a regular file")
    finally:
        os.close(reader)
    assert "PASS" not in text


def test_gate_against_with_a_stray_blank_is_the_provider(runs: tuple[Path, Path]) -> None:
    cur, base = runs
    result = invoke("gate", cur, "--baseline", base, "--against", " sdpa_flash ")
    assert result.exit_code == 0, result.output
    assert "speedup vs sdpa_flash" in flat(result.output)


def test_gate_tolerance_with_an_underscore_is_refused() -> None:
    # float() reads "5_0" as 50: a slip for 5.0 made the gate ten times laxer.
    with pytest.raises(BadInputError, match="expected a percentage"):
        parse_tolerance("5_0")


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> str:
    monkeypatch.setattr(sys, "argv", ["dkbench", *map(str, args)])
    # The entry's process-wide marks, kept from the tests that run after this one.
    monkeypatch.setattr(startup, "mark", lambda: None)
    monkeypatch.setattr(launch, "stop_on_sigterm_as_on_ctrl_c", lambda: None)
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as stop:
        launch.main()
    assert stop.value.code == 2
    return flat(capsys.readouterr().err)


@pytest.mark.parametrize(("command", "flags", "said"), [
    ("run", ["--providers", "sdpa_math", "--providers", "dkbench"],
     "--providers 'sdpa_math' and --providers 'dkbench': --providers takes one value"),
    ("run", ["--shard=1/2", "--shard", "2/2"], "--shard '1/2' and --shard '2/2'"),
    ("run", ["--compile-ahead", "--no-compile-ahead"], "--compile-ahead and --no-compile-ahead"),
    ("gate", ["cur", "-b", "x", "--baseline", "y"], "-b 'x' and --baseline 'y'"),
    ("env", ["--device", "cpu", "--device", "auto"], "--device 'cpu' and --device 'auto'"),
    # A command of a group: the check goes down to it.
    ("cache", ["show", "--cache", "a.json", "--cache", "b.json"],
     "--cache 'a.json' and --cache 'b.json'"),
])
def test_a_flag_of_one_value_given_twice_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture, command: str,
                                                    flags: list[str], said: str) -> None:
    # The parser kept the last value and dropped the first in silence: a flag that did nothing.
    assert said in _main(monkeypatch, capsys, command, *flags)


def test_the_same_value_twice_and_repeatable_flags_still_run() -> None:
    from typer.main import get_command

    from dkbench.cli import app

    run = get_command(app).commands["run"]
    assert launch.repeated_flag(run, ["--providers=sdpa_math", "--providers", "sdpa_math", "-q",
                                      "--quiet", "--only", "seqlen=32", "--only", "seqlen=64",
                                      "--", "--out"]) is None
