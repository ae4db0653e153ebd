"""Compiling ahead (`dkbench.measure.ahead`): which providers and cases go to the workers, what
the workers report, and what a failing, dying or slow worker costs (only its own group). The
workers are real spawned processes preparing tiny cases through Triton's interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dkbench.measure import ahead, runner
from dkbench.measure.ahead import Group, groups_for, run_groups
from dkbench.measure.envinfo import environment
from dkbench.results.schema import read_meta
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand

from .cli_helpers import flat, invoke, run_dir_of
from .specs import needs_interpreter, write_spec

CPU = torch.device("cpu")


def two_modes(tmp_path: Path):
    """A tiny sweep of one case per mode, fwd and fwd_bwd."""
    sweep = load_spec(write_spec(tmp_path, mode=["fwd", "fwd_bwd"], providers=["dkbench"]))
    return sweep, expand(sweep)


def context(sweep) -> runner.RunContext:
    return runner.RunContext(sweep, CPU, environment(CPU), "", None, "")


def test_groups_are_the_compiling_providers_that_can_run_here_training_first(
        tmp_path: Path) -> None:
    _, (fwd, fwd_bwd) = two_modes(tmp_path)
    names = ["sdpa_math", "dkbench", "dkbench+graph", "flex"]
    got = groups_for([(fwd, names), (fwd_bwd, names)], CPU)
    # sdpa_math compiles nothing; a graph row runs what its eager row compiled; flex cannot run
    # on the CPU; the fwd_bwd group first, as it compiles a backward too.
    assert got == [Group("dkbench", "fwd_bwd", (fwd_bwd,)), Group("dkbench", "fwd", (fwd,))]


@pytest.mark.parametrize(("cores", "groups", "want"), [(16, 10, 10), (16, 20, 12), (2, 5, 1),
                                                      (1, 3, 1), (8, 2, 2)])
def test_a_worker_per_group_within_the_cores_but_one(monkeypatch, cores: int, groups: int,
                                                      want: int) -> None:
    monkeypatch.setattr(ahead.os, "cpu_count", lambda: cores)
    plenty = 1000 * ahead.WORKER_HOST_BYTES
    assert ahead.worker_count([Group("dkbench", "fwd", ())] * groups, plenty) == want


@pytest.mark.parametrize(("available", "want"), [(10 * 4 * 2**30, 10), (9 * 2**30, 2),
                                                 (2**30, 1), (0, 10)])
def test_each_worker_needs_its_share_of_host_memory(monkeypatch, available: int,
                                                    want: int) -> None:
    """4 GiB of available memory a worker (0: unknown, no cap), at least one."""
    monkeypatch.setattr(ahead.os, "cpu_count", lambda: 16)
    assert ahead.WORKER_HOST_BYTES == 4 * 2**30
    assert ahead.worker_count([Group("dkbench", "fwd", ())] * 10, available) == want


def test_host_memory_is_read_where_the_system_says() -> None:
    got = ahead.host_memory_available()
    assert got is None or got > 0


@pytest.mark.parametrize(("given", "want"), [(None, str(ahead.COMPILE_THREADS)), ("7", None)])
def test_workers_hold_inductors_compile_pool_small_unless_told(tmp_path: Path, monkeypatch,
                                                              given: str | None,
                                                              want: str | None) -> None:
    """A worker starts with TORCHINDUCTOR_COMPILE_THREADS at COMPILE_THREADS, unless the user
    set it (then it inherits theirs)."""
    if given is None:
        monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", given)
    envs = []

    def spawn(context, target, args, name, *, daemon, env=None):
        envs.append(env)
        raise OSError("no process left")  # the test only reads what it was given

    monkeypatch.setattr(ahead, "spawn_worker", spawn)
    sweep, (fwd, _) = two_modes(tmp_path)
    with ahead.workers_for([Group("dkbench", "fwd", (fwd,))], sweep, CPU, None) as pool:
        got = pool.run([Group("dkbench", "fwd", (fwd,))])
    assert envs == [{"TORCHINDUCTOR_COMPILE_THREADS": want} if want else {}]
    # A worker that cannot start leaves its group undone, and the run goes on.
    assert got.not_started == ["OSError: no process left"]
    assert got.groups["dkbench fwd"]["problems"] == [
        "not compiled ahead: no worker was left to take it"]


def test_groups_hold_every_pending_case_of_their_mode_in_order(tmp_path: Path) -> None:
    sweep = load_spec(write_spec(tmp_path, seqlen=[32, 64, 96], providers=["dkbench"]))
    cases = expand(sweep)
    got = groups_for([(c, ["dkbench"]) for c in reversed(cases)], CPU)
    assert got == [Group("dkbench", "fwd", tuple(reversed(cases)))]


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_the_phase_needs_two_groups_to_pay(monkeypatch, count: int) -> None:
    found = [Group("dkbench", mode, ()) for mode in ("fwd", "fwd_bwd", "bwd")][:count]
    monkeypatch.setattr(ahead, "groups_for", lambda work, device: found)
    got = ahead.planned_groups([], torch.device("cuda", 0))  # only its type is read
    assert got == (found if count > 1 else [])
    assert ahead.planned_groups([], CPU) == []


def test_nothing_compiles_ahead_off_a_gpu(tmp_path: Path) -> None:
    sweep, cases = two_modes(tmp_path)
    assert ahead.planned_groups([(c, ["dkbench"]) for c in cases], CPU) == []


@needs_interpreter
def test_workers_prepare_each_case_and_report_what_did_not_go_right(tmp_path: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.setattr(ahead.os, "cpu_count", lambda: 4)  # room for a worker per group
    sweep, (fwd, fwd_bwd) = two_modes(tmp_path)
    heard = []
    # sdpa_flash cannot run on the CPU: its worker's preparation is a row "unsupported".
    got = run_groups(context(sweep), [Group("dkbench", "fwd_bwd", (fwd_bwd,)),
                                      Group("sdpa_flash", "fwd", (fwd,))],
                     lambda text, done, total: heard.append((text, done, total)),
                     log=tmp_path / "ahead.log")
    assert got.workers == 2 and got.seconds > 0
    assert (tmp_path / "ahead.log").exists()  # where the workers printed, not over the bar
    good, bad = got.groups["dkbench fwd_bwd"], got.groups["sdpa_flash fwd"]
    assert len(good["case_seconds"]) == 1 and good["case_seconds"][0] > 0
    assert good["problems"] == []
    assert len(bad["problems"]) == 1 and "unsupported" in bad["problems"][0]
    assert "needs a CUDA GPU" in bad["problems"][0]
    assert heard[-1] == ("compiled ahead in %.0f s" % got.seconds, 2, 2)
    assert all(total == 2 for _, _, total in heard)
    assert any("compiling ahead (2 workers): dkbench fwd_bwd" in text for text, _, _ in heard)


@needs_interpreter
def test_a_dead_worker_costs_its_own_group_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ahead.CRASH_ENV, "sdpa_math")
    sweep, (fwd, fwd_bwd) = two_modes(tmp_path)
    monkeypatch.setattr(ahead, "MAX_WORKERS", 1)  # one worker: its replacement takes the rest
    got = run_groups(context(sweep), [Group("sdpa_math", "fwd", (fwd,)),
                                      Group("dkbench", "fwd", (fwd,))])
    (problem,) = got.groups["sdpa_math fwd"]["problems"]
    assert f"the worker died (exit code {ahead.CRASH_EXIT}) at case 1 of 1" in problem
    assert got.groups["dkbench fwd"]["problems"] == []
    assert len(got.groups["dkbench fwd"]["case_seconds"]) == 1


def _hung_run(tmp_path: Path, monkeypatch, hung: str,
              phase_limit_s: float = 6.0) -> tuple[dict, dict]:
    """A run of one case with both providers compiled ahead, one worker, ``hung``'s group hanging
    in it; its rows by provider, and the phase's record."""
    monkeypatch.setenv(ahead.HANG_ENV, hung)
    monkeypatch.setattr(ahead, "CASE_LIMIT_S", 2.0)
    monkeypatch.setattr(ahead, "LIMIT_S", phase_limit_s)
    monkeypatch.setattr(ahead, "MAX_WORKERS", 1)  # one worker: its replacement takes the rest
    path = write_spec(tmp_path, providers=["sdpa_math", "dkbench"], baseline="sdpa_math")
    sweep = load_spec(path)
    (case,) = expand(sweep)
    groups = [Group(hung, "fwd", (case,)),
              Group(next(p for p in ("dkbench", "sdpa_math") if p != hung), "fwd", (case,))]
    monkeypatch.setattr(ahead, "planned_groups", lambda work, device: groups)
    plan = runner.plan_run(sweep, [case], sweep.providers, tmp_path / "out", None)
    rows = {row.provider: row for row in ahead.execute(sweep, path.read_text(), plan, CPU)}
    return rows, read_meta(plan.run_dir)["compiled_ahead"]


@needs_interpreter
def test_a_case_of_ours_that_never_ends_is_stopped_and_not_run(tmp_path: Path,
                                                                monkeypatch) -> None:
    """A worker still preparing a case of the bundled kernel after CASE_LIMIT_S is stopped; the
    phase goes on in a replacement, and the run writes that row as an error instead of
    preparing it (it would hang the run as it hung the worker)."""
    # The replacement worker must start (torch and triton imported) inside the phase's limit:
    # seconds on an idle machine, more on a loaded one; the phase ends when its groups do.
    rows, done = _hung_run(tmp_path, monkeypatch, "dkbench", phase_limit_s=120.0)
    why = ("not run: its preparation in the compile-ahead phase was still going after 2 s and "
           "was stopped (a kernel that never ends?); --no-compile-ahead prepares it in the run "
           "itself, for up to an hour")
    assert (rows["dkbench"].status, rows["dkbench"].message) == ("error", why)
    assert rows["sdpa_math"].status == "ok", rows["sdpa_math"].message
    assert done["stalled"] == [[rows["dkbench"].case_id, "dkbench", why]]
    (problem,) = done["groups"]["dkbench fwd"]["problems"]
    assert problem.endswith("still preparing after 2 s, so stopped; not run")
    assert done["groups"]["sdpa_math fwd"]["problems"] == []


@needs_interpreter
def test_a_peer_slow_to_prepare_is_left_to_the_phase_limit_and_run(tmp_path: Path,
                                                                    monkeypatch) -> None:
    """A peer's first compile may take minutes (FlashInfer's nvcc): past CASE_LIMIT_S it is not
    taken for a hang; the phase's own limit stops it, and the run prepares it itself."""
    rows, done = _hung_run(tmp_path, monkeypatch, "sdpa_math")
    assert done["stalled"] == []
    assert done["groups"]["sdpa_math fwd"]["problems"] == ["stopped after 6 s at case 1 of 1"]
    assert rows["sdpa_math"].status == rows["dkbench"].status == "ok"


@needs_interpreter
def test_the_phase_stops_at_its_time_limit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ahead, "LIMIT_S", 0.0)
    monkeypatch.setattr(ahead, "MAX_WORKERS", 1)
    sweep, (fwd, fwd_bwd) = two_modes(tmp_path)
    got = run_groups(context(sweep), [Group("dkbench", "fwd", (fwd,)),
                                      Group("dkbench", "fwd_bwd", (fwd_bwd,))])
    assert got.groups["dkbench fwd_bwd"]["problems"] == ["not started within 0 s"]
    # The first went to the worker (stopped at once) or never reached it before the limit.
    (first,) = got.groups["dkbench fwd"]["problems"]
    assert first in ("stopped after 0 s at case 1 of 1", "not started within 0 s")


def test_compile_ahead_with_gpus_is_refused(tmp_path: Path) -> None:
    result = invoke("run", write_spec(tmp_path), "--out", tmp_path / "out", "--gpus", "cpu:1",
                    "--compile-ahead")
    assert result.exit_code == 2
    assert "--compile-ahead runs on one GPU; with --gpus cpu:1" in flat(result.output)


def test_compile_ahead_on_the_cpu_says_it_has_nothing_to_do(tmp_path: Path) -> None:
    result = invoke("run", write_spec(tmp_path), "--out", tmp_path / "out", "--compile-ahead")
    assert result.exit_code == 0, result.output
    assert "Triton's interpreter on the CPU compiles nothing" in flat(result.output)
    assert "compiled_ahead" not in read_meta(run_dir_of(tmp_path / "out"))


def test_compile_ahead_asked_for_where_nothing_would_compile_ahead_says_so(
        tmp_path: Path, monkeypatch) -> None:
    """On a GPU, a run whose phase did not run (one provider and mode compile) warns about the
    flag it was given."""
    monkeypatch.setattr(runner, "resolve_device",
                        lambda choice, spec=None: torch.device("cuda", 0))
    monkeypatch.setattr(ahead, "execute", lambda *args, **kwargs: [])
    result = invoke("run", write_spec(tmp_path), "--out", tmp_path / "out", "--compile-ahead")
    assert result.exit_code == 0, result.output
    assert ("--compile-ahead: fewer than two providers and modes compile in this run, so none "
            "was compiled ahead") in flat(result.output)
