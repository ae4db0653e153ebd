"""Crash safety of runs spread over worker processes (`--gpus cpu:N`), shards and merge: a worker
that hangs, a parent interrupted or killed, a pool that fails to start, shards that do not fit."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dkbench.errors import NoWorkersLeft
from dkbench.measure import parallel, runner
from dkbench.measure.shard import case_cost
from dkbench.results.schema import META_FILE, read_meta, read_results
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand

from .cli_helpers import flat, invoke, pairs, run_dir_of
from .specs import write_spec

ROOT = Path(__file__).resolve().parents[2]


def two_cases(folder: Path, **overrides) -> Path:
    """Two cheap cases of different costs (the larger is handed out first)."""
    return write_spec(folder, seqlen=[32, 48], **overrides)


def largest(spec: Path) -> str:
    return max(expand(load_spec(spec)), key=case_cost).case_id


def no_workers_left() -> None:
    assert multiprocessing.active_children() == [], "a worker process was left running"


def test_a_hung_worker_costs_only_its_case(tmp_path: Path, monkeypatch) -> None:
    spec = two_cases(tmp_path)
    victim = largest(spec)
    monkeypatch.setattr(parallel, "CASE_LIMIT_S", 4.0)
    result = invoke("run", spec, "--out", tmp_path / "out", "-q", "--gpus", "cpu:1",
                    env={parallel.HANG_ENV: victim})
    assert result.exit_code == 0, result.output
    assert ("worker on cpu 0 was stopped after 4 s without a word from it (hung); starting a "
            "replacement (1 of 2 restarts)") in flat(result.stderr), result.output
    frame = read_results(run_dir_of(tmp_path / "out")).set_index("case_id")
    assert len(frame) == 2
    assert frame.loc[victim, "status"] == "error"
    assert frame.loc[victim, "message"] == ("worker on cpu 0 was stopped after 4 s without a "
                                            "word from it (hung) while running this case")
    assert set(frame.drop(index=victim)["status"]) == {"ok"}
    no_workers_left()


def test_ctrl_c_keeps_the_rows_already_sent_and_resume_finishes_the_rest(
        tmp_path: Path, monkeypatch) -> None:
    spec = two_cases(tmp_path, providers=["sdpa_math", "sdpa_efficient"],
                     timing={"warmup_ms": 1, "rep_ms": 1, "interleave": False})
    handle = parallel._Pool._handle

    def interrupted(self, w, msg):
        handle(self, w, msg)
        if msg[0] == "start" and msg[2] == "sdpa_efficient":
            assert w.conn.poll(60)  # its row is measured and waits in the pipe
            raise KeyboardInterrupt

    monkeypatch.setattr(parallel._Pool, "_handle", interrupted)
    result = invoke("run", spec, "--out", tmp_path / "out", "-q", "--gpus", "cpu:1")
    assert result.exit_code == 130, result.output
    run_dir = run_dir_of(tmp_path / "out")
    assert (f"Interrupted. Rows so far are in {run_dir}; finish with --resume {run_dir}"
            in flat(result.stderr)), result.output
    no_workers_left()
    victim = largest(spec)
    assert pairs(run_dir) == [(victim, "sdpa_math"), (victim, "sdpa_efficient")]

    monkeypatch.undo()
    result = invoke("run", "--resume", run_dir, "-q")
    assert result.exit_code == 0, result.output
    done = pairs(run_dir)
    assert len(done) == len(set(done)) == 4  # the other case's two rows, none twice
    assert "finished" in read_meta(run_dir)


def test_a_pool_that_fails_to_start_leaves_no_worker(tmp_path: Path, monkeypatch) -> None:
    spec = two_cases(tmp_path)
    sweep = load_spec(spec)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    started = []
    spawn = parallel.spawn_worker

    def second_fails(*args, **kwargs):
        if started:
            raise OSError("Resource temporarily unavailable")
        proc, conn = spawn(*args, **kwargs)
        started.append(proc)
        return proc, conn

    monkeypatch.setattr(parallel, "spawn_worker", second_fails)
    with pytest.raises(NoWorkersLeft, match="could not start a worker process on cpu 1: "
                                            "Resource temporarily unavailable"):
        parallel.execute_parallel(sweep, spec.read_text(), plan, parallel.parse_gpus("cpu:2"))
    assert len(started) == 1 and not started[0].is_alive()
    no_workers_left()


def test_a_worker_the_os_will_not_start_is_one_line_not_a_traceback(
        tmp_path: Path, monkeypatch) -> None:
    def refused(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(parallel, "spawn_worker", refused)
    result = invoke("run", two_cases(tmp_path), "--out", tmp_path / "out", "--gpus", "cpu:1",
                    "-q")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert ("could not start a worker process on cpu 0: Resource temporarily unavailable"
            in flat(result.stderr))


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_a_worker_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    spec = two_cases(tmp_path)
    smaller = next(c.case_id for c in expand(load_spec(spec)) if c.case_id != largest(spec))
    env = {**os.environ, parallel.HANG_ENV: smaller}  # the first case done, it hangs in the next
    parent = subprocess.Popen([sys.executable, "cli.py", "run", str(spec), "--out",
                               str(tmp_path / "out"), "-q", "--gpus", "cpu:1"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        worker = None
        deadline = time.monotonic() + 90
        csv = tmp_path / "out"
        while time.monotonic() < deadline and not any(csv.glob("*/results.csv")):
            time.sleep(0.3)
        for pid in _children(parent.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmd:
                worker = pid
        assert worker is not None, "the worker never started or its first case never ended"
        time.sleep(1)  # it has the second case by now, and hangs in it
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = _running(worker)
        if alive:
            os.kill(worker, signal.SIGKILL)
        assert not alive, "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# -- shards and merge --

def _shard(spec: Path, out: Path, *flags: object) -> Path:
    result = invoke("run", spec, "--out", out, "-q", *flags)
    assert result.exit_code == 0, result.output
    return run_dir_of(out)


def _set_meta(run_dir: Path, **values) -> None:
    meta = json.loads((run_dir / META_FILE).read_text())
    meta.update(values)
    (run_dir / META_FILE).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A six-case spec and its shard 1/2."""
    folder = tmp_path_factory.mktemp("six")
    spec = write_spec(folder, seqlen=[32, 48, 64], heads=[2, 4])
    return spec, _shard(spec, folder / "s1", "--shard", "1/2")


@pytest.mark.parametrize(("flags", "words"), [
    (("--shard", "2/3"), "is shard 2/3, {first} shard 1/2: they split the cases differently"),
    (("--shard", "2/2", "--only", "seqlen=32,48"),
     "ran with --only seqlen=32,48, {first} with (none)"),
    (("--shard", "2/2", "--providers", "sdpa_efficient"),
     "ran with --providers sdpa_efficient, {first} with sdpa_math"),
])
def test_merge_refuses_shards_that_split_another_way(six, tmp_path: Path, flags, words) -> None:
    spec, first = six
    other = _shard(spec, tmp_path / "other", *flags)
    out = tmp_path / "merged"
    result = invoke("merge", first, other, "--out", out)
    assert result.exit_code == 2, result.output
    assert f"{other} {words.format(first=first)}" in flat(result.stderr), result.output
    assert "(--force merges anyway)" in flat(result.stderr)
    assert not out.exists()


def test_a_forced_merge_of_other_providers_resumes_all_of_them(six, tmp_path: Path) -> None:
    spec, first = six
    other = _shard(spec, tmp_path / "other", "--shard", "2/2", "--providers", "sdpa_efficient")
    out = tmp_path / "merged"
    assert invoke("merge", first, other, "--out", out, "--force").exit_code == 0
    assert read_meta(out)["providers"] == ["sdpa_math", "sdpa_efficient"]
    result = invoke("run", "--resume", out, "-q")
    assert result.exit_code == 0, result.output
    done = pairs(out)
    assert len(done) == len(set(done)) == 12  # each of the six cases by both providers, once


def test_merge_says_in_one_line_why_a_recorded_spec_cannot_be_expanded(six, tmp_path: Path
                                                                        ) -> None:
    spec, shared = six
    first = tmp_path / "first" / shared.name
    shutil.copytree(shared, first)  # the module's shard stays as it is for the other tests
    second = _shard(spec, tmp_path / "second", "--shard", "2/2")
    for run_dir in (first, second):
        _set_meta(run_dir, spec=None)
    out = tmp_path / "merged"
    result = invoke("merge", first, second, "--out", out)
    assert result.exit_code == 0, result.output
    (note,) = [line for line in result.stderr.splitlines() if "could not expand" in line]
    # was pydantic's own text over three lines, ending in a link to its docs
    assert "pydantic.dev" not in result.stderr, result.stderr
    assert f"{first / META_FILE}" in flat(result.stderr), result.stderr


def test_merge_refuses_a_shard_given_twice(six, tmp_path: Path) -> None:
    spec, first = six
    again = _shard(spec, tmp_path / "again", "--shard", "1/2")
    out = tmp_path / "merged"
    result = invoke("merge", first, again, "--out", out)
    assert result.exit_code == 2, result.output
    assert f"shard 1/2 is given 2 times ({first}, {again})" in flat(result.stderr), result.output
    assert not out.exists()


def test_a_forced_merge_stopped_before_its_meta_leaves_no_old_meta(
        six, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dkbench.errors import ResultsWriteError
    from dkbench.results import merge

    spec, first = six
    second = _shard(spec, tmp_path / "s2", "--shard", "2/2")
    out = tmp_path / "merged"
    assert invoke("merge", first, "--out", out).exit_code == 0
    assert read_meta(out)["merged_from"][0]["shard"] == "1/2"

    def stopped(run_dir: Path, meta: dict) -> None:
        raise ResultsWriteError(f"{run_dir / META_FILE}: cannot write: disk full")

    monkeypatch.setattr(merge, "write_meta", stopped)
    result = invoke("merge", first, second, "--out", out, "--force")
    assert result.exit_code != 0 and "disk full" in flat(result.output + result.stderr)
    # The new rows, and no meta.json of the old merge to describe them.
    assert len(read_results(out)) == len(read_results(first)) + len(read_results(second))
    assert not (out / META_FILE).exists()
    monkeypatch.undo()
    again = invoke("merge", first, second, "--out", out)
    assert again.exit_code == 2 and "already holds a run" in flat(again.stderr)


# -- a Ctrl-C while a worker starts --

def _report_blocked(conn) -> None:
    """A worker's target: whether SIGINT is in its blocked mask (Linux's /proc)."""
    status = Path("/proc/self/status").read_text()
    blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:"))
                  .split()[1], 16)
    conn.send(bool(blocked & (1 << (signal.SIGINT - 1))))
    conn.close()


@pytest.fixture
def sigint_default():
    """SIGINT at Python's handler for the test, whatever the test runner's was (a background
    job's is ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("sigint_default")
def test_a_ctrl_c_while_a_worker_starts_is_raised_after_the_start() -> None:
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with parallel._sigint_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # held: neither raised here nor dropped
            reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored_while_a_worker_starts() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    try:
        with parallel._sigint_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        time.sleep(0.05)  # nothing raised after the start either
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("sigint_default")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_worker_starts_with_ctrl_c_blocked() -> None:
    proc, conn = parallel.spawn_worker(multiprocessing.get_context("spawn"), _report_blocked, (),
                                       "dkbench-probe", daemon=True)
    try:
        assert conn.poll(120) and conn.recv() is True
    finally:
        proc.join(30)
        conn.close()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()  # the parent's mask restored
