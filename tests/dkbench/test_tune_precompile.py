"""The tune's compile phase: how many workers, which failures are final, which outcomes hold
behind which pins, and the spawned workers (here on the CPU, through the interpreter): each
candidate runs once, a failure comes back as the runner records it, a worker that dies costs only
its candidate, and workers that cannot start leave the candidates to the timing loop."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

from dkbench.measure import runner
from dkbench.measure.check import CheckResult
from dkbench.measure.envinfo import environment
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand
from dkbench.tune import precompile
from dkbench.tune.precompile import (
    Compiled,
    CompileTask,
    Failure,
    Found,
    WorkerPool,
    worker_count,
)
from kernels import LaunchConfig
from tests.dkbench.specs import needs_interpreter
from tests.dkbench.test_tune import write_spec

CPU = torch.device("cpu")


class Crash:
    """Unpickled in a worker, it ends the worker's process, as a segfault would."""

    def __reduce__(self):
        return (os._exit, (3,))


class Hang:
    """Unpickled in a worker, it keeps the worker busy for good, as a kernel that never ends."""

    def __reduce__(self):
        return (time.sleep, (3600,))


def test_worker_count_is_one_per_core_capped_and_none_in_the_interpreter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)  # only its type is read
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert worker_count(cuda, 48) == precompile.MAX_WORKERS == 8
    assert worker_count(cuda, 3) == 3
    assert worker_count(cuda, 1) == 0  # one worker would only add its start-up
    assert worker_count(CPU, 48) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert worker_count(cuda, 48) == 2


def test_only_failures_that_are_not_for_want_of_memory_are_final() -> None:
    task = CompileTask("fwd", None, "m32n32w4s1", None)
    compiled = Compiled()
    compiled.record(task, Failure("oom", "OutOfMemoryError: CUDA out of memory"))
    compiled.record(task, None)
    assert compiled.found([task]).failures == {}
    failed = Failure("error", "RuntimeError: PassManager::run failed")
    compiled.record(task, failed)
    found = compiled.found([task])
    assert found.failures == {"m32n32w4s1": failed} and found.checks == {}


def test_a_candidate_that_ran_right_keeps_its_check() -> None:
    compiled = Compiled()
    checked = CheckResult(1e-3, 2e-4, True, "out")
    task = CompileTask("fwd", None, "m32n32w4s1", None)
    compiled.record(task, checked)
    found = compiled.found([task])
    assert found.checks == {"m32n32w4s1": checked} and found.failures == {}


DEFAULT, OTHER = LaunchConfig(32, 32, 4, 1), LaunchConfig(16, 32, 4, 1)


def test_an_outcome_holds_only_behind_the_pins_it_ran_behind() -> None:
    # The batch ran the dk/dv candidates behind the default forward; the forward's winner was
    # another config. Its checks and failures are not theirs behind that winner, its seconds are.
    def bwd(name: str, forward: LaunchConfig) -> CompileTask:
        return CompileTask("bwd", "case", name, {"fwd": forward, "bwd": DEFAULT})

    compiled = Compiled()
    checked = CheckResult(1e-3, 2e-4, True, "out")
    compiled.record(bwd("right", DEFAULT), checked, 1.234)
    compiled.record(bwd("wrong", DEFAULT), Failure("error", "RuntimeError: boom"), 0.5)
    compiled.record(bwd("died", DEFAULT), Failure("error", "the compile worker died"),
                    any_pins=True)
    behind_defaults = compiled.found([bwd(n, DEFAULT) for n in ("right", "wrong", "died")])
    assert behind_defaults.checks == {"right": checked}
    assert set(behind_defaults.failures) == {"wrong", "died"}
    assert behind_defaults.seconds == {"right": 1.23, "wrong": 0.5}
    behind_winner = compiled.found([bwd(n, OTHER) for n in ("right", "wrong", "died")])
    assert behind_winner.checks == {}
    # A dead worker's candidate is not run again in the tune's own process, whatever the pins.
    assert behind_winner.failures == {"died": Failure("error", "the compile worker died")}
    assert behind_winner.seconds == behind_defaults.seconds
    # The same name in another case or kernel is another candidate.
    assert compiled.found([CompileTask("dq", "case", "right", {"fwd": DEFAULT, "bwd": DEFAULT})
                           ]) == Found()
    assert compiled.found([CompileTask("bwd", "other case", "right",
                                       {"fwd": DEFAULT, "bwd": DEFAULT})]) == Found()


def tasks_of(tmp_path: Path, *pins: object) -> tuple[object, list[CompileTask]]:
    sweep = load_spec(write_spec(tmp_path))
    (case,) = expand(sweep)
    return sweep, [CompileTask("fwd", case, f"c{i}", pin) for i, pin in enumerate(pins)]


GOOD = {"fwd": LaunchConfig(32, 32, 4, 1)}
BAD = {"fwd": LaunchConfig(32, 48, 4, 1)}  # block_n 48 is no power of two: refused at launch


@needs_interpreter
def test_workers_run_each_candidate_and_a_dead_worker_costs_only_its_own(tmp_path: Path) -> None:
    sweep, tasks = tasks_of(tmp_path, GOOD, BAD, Crash(), GOOD)
    heard = []
    pool = WorkerPool((sweep, environment(CPU), CPU), 1)
    try:
        first = pool.workers[0].proc
        compiled = pool.compile(tasks, lambda task: heard.append(task.name))
        replacement = pool.workers[0].proc
    finally:
        pool.close(graceful=True)
    assert heard == ["c0", "c1", "c2", "c3"]
    found = compiled.found(tasks)
    assert set(found.failures) == {"c1", "c2"} and set(found.seconds) == {"c0", "c1", "c3"}
    # The two right ones bring their checks back: the same numbers the timing loop's own check
    # of that config finds on the same seeded inputs.
    assert set(found.checks) == {"c0", "c3"} and found.checks["c0"] == found.checks["c3"]
    assert found.checks["c0"].ok and 0 < found.checks["c0"].rel_err < 1e-5
    (case,) = {task.case for task in tasks}
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    seed = runner.case_seed(sweep, case)
    from dkbench.measure.check import random_inputs
    from dkbench.measure.providers.bundled import BundledKernel

    ctx = runner.RunContext(sweep, CPU, environment(CPU), "", None, "",
                            pinned={"c0": (BundledKernel(), GOOD)})
    own = runner.prepare_one(ctx, case, "c0", layout, float("nan"),
                             random_inputs(case, CPU, False, seed), seed + 1)
    assert (own.row.max_abs_err, own.row.rel_err) == (found.checks["c0"].max_abs_err,
                                                      found.checks["c0"].rel_err)
    assert found.failures["c1"].status == "error"
    assert found.failures["c1"].message.startswith("ValueError: invalid launch config m32n48")
    died = Failure("error", "the compile worker died (exit code 3) while running this config")
    assert found.failures["c2"] == died
    # Behind other pins only the death holds: the timing loop runs the others itself.
    other = compiled.found([dataclasses.replace(t, pin={"fwd": OTHER}) for t in tasks])
    assert other.failures == {"c2": died} and other.checks == {}
    assert replacement is not first and first.exitcode == 3  # c3 ran on the replacement
    assert compiled.warnings == [] and not replacement.is_alive()


@needs_interpreter
def test_a_candidate_that_never_ends_is_stopped_and_costs_only_its_own(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(precompile, "CANDIDATE_LIMIT_S", 3.0)
    sweep, tasks = tasks_of(tmp_path, GOOD, Hang(), GOOD)
    heard = []
    pool = WorkerPool((sweep, environment(CPU), CPU), 1)
    try:
        first = pool.workers[0].proc
        started = time.monotonic()
        compiled = pool.compile(tasks, lambda task: heard.append(task.name))
        took = time.monotonic() - started
    finally:
        pool.close(graceful=True)
    assert heard == ["c0", "c1", "c2"] and took < 60
    found = compiled.found(tasks)
    assert set(found.checks) == {"c0", "c2"}  # the one after it ran on the replacement
    assert found.failures["c1"] == Failure(
        "error", "still running after 3 s (its compile, check and first call), so it was "
                 "stopped: a kernel that never ends?")
    # It holds behind any pins: the timing loop's process would hang on it too.
    other = compiled.found([dataclasses.replace(t, pin={"fwd": OTHER}) for t in tasks])
    assert other.failures == {"c1": found.failures["c1"]}
    assert not first.is_alive()


@needs_interpreter
def test_workers_that_cannot_start_leave_the_candidates_to_the_timing_loop(
        tmp_path: Path) -> None:
    sweep, tasks = tasks_of(tmp_path, GOOD, BAD)
    heard = []
    pool = WorkerPool((sweep, {"broken": Crash()}, CPU), 2)  # each dies as it starts
    try:
        compiled = pool.compile(tasks, lambda task: heard.append(task.name))
    finally:
        pool.close(graceful=True)
    assert compiled.found(tasks) == Found() and pool.workers == []
    assert heard == ["c0", "c1"]  # passed on, not run
    (warning,) = compiled.warnings
    assert warning == "no compile worker could start; the candidates compile as they are timed"


@pytest.mark.parametrize(("cores", "workers", "want"), [(16, 8, 2), (16, 3, 5), (2, 8, 1),
                                                        (16, 0, 16)])
def test_compile_workers_share_the_cores_out(monkeypatch, cores: int, workers: int,
                                             want: int) -> None:
    from dkbench.tune import precompile

    monkeypatch.setattr(precompile.os, "cpu_count", lambda: cores)
    assert precompile.worker_threads(workers) == want
