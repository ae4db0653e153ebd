"""Fault injection: runs killed at random points, results files torn at every byte, a disk that
fills up midway and read-only run directories. Each ends in a clean error or a run that resumes
to the rows an uninterrupted run has, none lost and none twice."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from dkbench.errors import TornRowWarning
from dkbench.measure import runner
from dkbench.results import schema as results
from dkbench.results.schema import META_FILE, RESULTS_FILE, read_results
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand

from .cli_helpers import flat, invoke, pairs, run_dir_of, run_to_end
from .specs import needs_interpreter, write_spec

ROOT = Path(__file__).resolve().parents[2]
AS_ROOT = os.geteuid() == 0  # chmod does not stop root: simulate the refusal instead





def row_lines(run_dir: Path) -> list[bytes]:
    return (run_dir / RESULTS_FILE).read_bytes().splitlines(keepends=True)[1:]


def tiny_spec(folder: Path) -> Path:
    """Three cases x (sdpa_math, dkbench), timed one provider at a time so that the rows land one
    by one: a second or two through the interpreter."""
    return write_spec(folder, seqlen=[32, 48, 64], providers=["sdpa_math", "dkbench"],
                      baseline="sdpa_math", timing={"warmup_ms": 1, "rep_ms": 1,
                                                    "interleave": False})


def quick_spec(folder: Path) -> Path:
    """Four cases of sdpa_math alone, for the faults that need no kernel."""
    return write_spec(folder, seqlen=[32, 48], heads=[2, 4])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(spec, run directory) of the tiny spec run start to finish."""
    folder = tmp_path_factory.mktemp("whole")
    spec = tiny_spec(folder)
    return spec, run_to_end(spec, folder / "out", "--device", "cpu")


# -- (a) killed at random points, then resumed --

def written_rows(out: Path) -> int:
    found = list(out.glob(f"*/{RESULTS_FILE}"))
    return max(found[0].read_bytes().count(b"\n") - 1, 0) if found else 0


def kill_after(spec: Path, out: Path, rows: int, delay: float) -> None:
    """Start `cli.py run` and SIGKILL it ``delay`` seconds after its run directory holds meta.json
    and ``rows`` rows. Counting rows, not seconds from the start, puts the kill where it was
    meant to land however slow the machine (the imports alone take seconds)."""
    proc = subprocess.Popen([sys.executable, "cli.py", "run", str(spec), "--device", "cpu",
                             "--out", str(out), "-q"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not (list(out.glob(f"*/{META_FILE}"))
                                           and written_rows(out) >= rows):
            assert time.monotonic() < deadline, "the run never got there"
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)


@needs_interpreter
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_killed_run_resumes_to_the_full_set(uninterrupted, tmp_path: Path, seed: int) -> None:
    spec, whole = uninterrupted
    out = tmp_path / "out"
    # Soon after row 0-1, 2-3, 4-5 or 5 of 6 is written: the seeds cover the whole run.
    rng = random.Random(seed)
    kill_after(spec, out, min(2 * seed + rng.randrange(2), len(pairs(whole)) - 1),
               rng.uniform(0.0, 0.3))
    run_dir = run_dir_of(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TornRowWarning)
        survived = row_lines(run_dir) if (run_dir / RESULTS_FILE).exists() else []
        if survived:
            read_results(run_dir)  # sets a torn last row aside, as the resume would
            survived = row_lines(run_dir)

    result = invoke("run", "--resume", run_dir, "-q")
    assert result.exit_code == 0, result.output
    final = row_lines(run_dir)
    assert final[:len(survived)] == survived  # every finished row kept, byte for byte
    got = pairs(run_dir)
    assert len(got) == len(set(got))  # no (case_id, provider) twice
    assert set(got) == set(pairs(whole))


# -- (b) torn at every byte of the last row --

def test_torn_at_every_byte_of_the_last_row(uninterrupted, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spec, whole = uninterrupted
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # hundreds of cuts; durability is not tested
    sweep = load_spec(spec)
    cases = expand(sweep)
    data = (whole / RESULTS_FILE).read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    last = pairs(whole)[-1]
    run_dir = Path(shutil.copytree(whole, tmp_path / "run"))
    csv = run_dir / RESULTS_FILE
    for cut in range(start, len(data)):
        csv.write_bytes(data[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cut % 2:  # odd cuts through a resume's plan, even ones through a plain read
                plan = runner.plan_run(sweep, cases, sweep.providers, tmp_path, run_dir)
                done, notes = plan.done, plan.warnings
                pending = {(c.case_id, n) for c, names in
                           runner.pending_work(sweep, plan, sweep.baseline) for n in names}
                assert pending == {last}, cut
            else:
                frame = read_results(run_dir)
                done = set(zip(frame["case_id"], frame["provider"]))
                notes = [str(w.message) for w in caught if w.category is TornRowWarning]
        assert done == set(pairs(whole)) - {last}, cut
        assert csv.read_bytes() == data[:start], cut  # cut back to the last whole row
        aside = sorted(run_dir.glob(RESULTS_FILE + ".torn-*"))
        if cut == start:  # the row was never begun: nothing torn
            assert not aside and not notes, cut
            continue
        assert len(aside) == 1 and aside[0].read_bytes() == data[start:cut], cut
        assert len(notes) == 1 and str(aside[0]) in notes[0], (cut, notes)
        aside[0].unlink()


# -- (c) the disk fills up midway --

@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(spec, run directory) of `quick_spec` run start to finish."""
    folder = tmp_path_factory.mktemp("quick")
    spec = quick_spec(folder)
    return spec, run_to_end(spec, folder / "out")


@pytest.mark.parametrize("how", ["raises", "partial", "short"])
def test_disk_full_midway_stops_cleanly_and_resumes(quick, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    how: str) -> None:
    spec, whole = quick
    out = tmp_path / "out"
    real, calls = results._write, []

    def full_disk(fd: int, data: bytes) -> int:
        calls.append(data)
        if len(calls) < 3:
            return real(fd, data)
        if how == "short":
            return real(fd, data[:len(data) // 2])  # the kernel wrote what fitted
        if how == "partial":
            real(fd, data[:len(data) // 3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results, "_write", full_disk)
    result = invoke("run", spec, "--out", out, "-q")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    run_dir = run_dir_of(out)
    csv = run_dir / RESULTS_FILE
    assert f"error: {csv}: cannot write a row:" in flat(result.stderr), result.output
    if how != "short":
        assert "No space left on device" in flat(result.stderr), result.output
    assert f"finish with --resume {run_dir}" in flat(result.stderr), result.output
    assert csv.read_bytes() == b"".join(calls[:2])  # earlier rows intact, no partial line
    assert len(row_lines(run_dir)) == 2

    monkeypatch.setattr(results, "_write", real)
    result = invoke("run", "--resume", run_dir, "-q")
    assert result.exit_code == 0, result.output
    got = pairs(run_dir)
    assert len(got) == len(set(got)) and set(got) == set(pairs(whole))
    assert csv.read_bytes().startswith(b"".join(calls[:2]))


def test_meta_that_cannot_be_written_stops_cleanly(quick, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def full_disk(self: Path, *args, **kwargs):
        if self.name == META_FILE + ".tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    result = invoke("run", quick[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2, result.output
    meta = run_dir_of(tmp_path / "out") / META_FILE
    assert f"error: {meta}: cannot write: No space left on device" in flat(result.stderr), \
        result.output
    assert "Traceback" not in result.output


# -- (d) read-only files on resume --

@pytest.mark.parametrize("target", [RESULTS_FILE, META_FILE, "."])
def test_read_only_run_on_resume_exits_2_naming_the_file(quick, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         target: str) -> None:
    run_dir = Path(shutil.copytree(quick[1], tmp_path / "run"))
    csv = run_dir / RESULTS_FILE
    csv.write_bytes(b"".join(csv.read_bytes().splitlines(keepends=True)[:3]))  # 2 rows to go
    before = csv.read_bytes()
    path = (run_dir / target).resolve()
    mode = path.stat().st_mode
    if AS_ROOT:
        real = os.access

        def access(p, how, *args, **kwargs) -> bool:
            if Path(p).resolve() == path and how & os.W_OK:
                return False
            return real(p, how, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    else:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        result = invoke("run", quick[0], "--resume", run_dir, "-q")
    finally:
        path.chmod(mode)
    assert result.exit_code == 2, result.output
    assert f"{run_dir / target if target != '.' else run_dir} is read-only" in flat(
        result.stderr), result.output
    assert "Traceback" not in result.output
    assert csv.read_bytes() == before


def test_commands_name_a_torn_row_in_one_warning_line(tmp_path: Path) -> None:
    spec = quick_spec(tmp_path)
    assert invoke("run", spec, "--device", "cpu", "--out", tmp_path / "out", "-q").exit_code == 0
    run_dir = run_dir_of(tmp_path / "out")
    baseline = tmp_path / "baseline"
    shutil.copytree(run_dir, baseline)
    csv = run_dir / RESULTS_FILE
    csv.write_bytes(csv.read_bytes()[:-10])
    result = invoke("gate", run_dir, "--baseline", baseline, "--metric", "ms")
    assert result.exit_code == 0, result.output
    text = flat(result.stderr)
    assert text.startswith(f"warning: {csv}: its last row was cut off"), result.stderr
    assert "TornRowWarning" not in result.stderr and "Traceback" not in result.output
