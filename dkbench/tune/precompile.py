"""Compile every candidate of a tune before any is timed, several at once in worker processes.

Triton compiles a kernel at its first launch, a second or more per config, and a tune measures
dozens of configs. Before anything is timed, the workers prepare, check and run each candidate of
every (case, kernel) once (`runner.prepare_one`), which compiles its kernels into Triton's on-disk
cache: the workers inherit this process's environment, TRITON_CACHE_DIR included, so the timing
loop loads each kernel instead of compiling it. It is one batch, case by case in tuning order
(so that a worker mostly stays on one case and keeps its inputs), not one per (case, kernel):
each of those ended in a tail where most workers idled. So a backward kernel's candidates run
behind the defaults of the kernels tuned before it, whose winners are only known once those are
timed; the disk cache holds a kernel whatever the other kernels' pins.

What a candidate's run found is reused only where the timing loop pins what it ran behind (the
kernels before it kept their defaults): its check (`RunContext.prechecked`: the worker ran it on
the same device with the same seeded inputs), and its failure, which is then not timed, except for
want of memory (the workers share the GPU, so it is tried again alone). Behind other pins the
timing loop prepares and checks it itself. A worker that dies costs the candidate it was on
(recorded as an error) and is replaced; that failure, and one that broke a worker's CUDA context,
hold whatever the pins, as the same run in the timing loop's process could end the tune. So does
a candidate still running after `CANDIDATE_LIMIT_S` (a kernel that never ends would hang the
tune): its worker is stopped and replaced. Workers that cannot start leave their candidates to
the timing loop. The workers start once, for the batch.

In Triton's interpreter there is nothing to compile: the phase runs in this process.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch

from ..measure import runner
from ..measure.check import CheckResult
from ..measure.parallel import (
    CONTEXT_LOST_EXIT,
    _context_lost,
    describe_exit,
    poll_workers,
    spawn_worker,
)
from ..measure.providers.bundled import BundledKernel
from ..spec.sweep import Case, Sweep

# More workers did not compile faster: on the H200 machine's 16 cores the phi-3 tune's compile
# phase took 80 s with 8 workers and 93 s with 16 (each worker starting a thread per core), and
# with the cores shared out and one batch, 28 s with 8 and 33 s with 12.
MAX_WORKERS = 8
POLL_S = 1.0  # how often the parent checks on its workers while no message arrives
# A candidate's run (its compile, check and warm-up call) takes seconds, a minute at most on the
# largest configs; one still running after this is taken to be a kernel that never ends.
CANDIDATE_LIMIT_S = 300.0


@dataclass(frozen=True)
class CompileTask:
    """One candidate of a kernel: the case in the mode that runs it, and what it pins."""

    kernel: str
    case: Case
    name: str
    pin: object  # the config argument of BundledKernel.prepare

    @property
    def key(self) -> tuple[Case, str, str]:
        """What tells it apart in a batch of many cases and kernels: all but its pins."""
        return self.case, self.kernel, self.name


@dataclass(frozen=True)
class Failure:
    """How a candidate failed, as the runner writes it in a row."""

    status: str
    message: str


def worker_threads(workers: int) -> int:
    """CPU threads for each of ``workers`` processes: the cores shared out, at least one. Left
    at torch's default, each worker's CPU ops (the layout, the plans, the check's inputs) would
    start one thread per core, and eight workers' threads contend for the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def worker_count(device: torch.device, batch: int) -> int:
    """Workers for a batch of ``batch`` candidates: one per core, at most MAX_WORKERS and one
    per candidate; 0 (this process) in the interpreter, or where one worker would only add
    its start-up."""
    if device.type != "cuda":
        return 0
    count = min(os.cpu_count() or 1, MAX_WORKERS, batch)
    return count if count > 1 else 0


class Compiler:
    """Runs candidates once on one device, keeping the last case's layout and inputs."""

    def __init__(self, sweep: Sweep, env: dict, device: torch.device) -> None:
        self.sweep, self.env, self.device = sweep, env, device
        self._case: Case | None = None
        self._built: tuple | None = None

    def release(self) -> None:
        """Drop the case's inputs, so that the GPU's memory is the timing loop's."""
        self._case = self._built = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def timed_run(self, task: CompileTask) -> tuple[Failure | CheckResult | None, float]:
        """`run`, with its seconds."""
        started = time.perf_counter()
        outcome = self.run(task)
        return outcome, time.perf_counter() - started

    def run(self, task: CompileTask) -> Failure | CheckResult | None:
        """The candidate's failure, or its check when it ran and was right (None when the sweep
        checks nothing, or its case could not be built here: the timing loop builds it again and
        records why)."""
        case = task.case
        if case != self._case:
            self._case, self._built = case, None  # the last case's inputs go before new ones come
            try:
                self._built = runner.case_inputs(self.sweep, case, self.device)
            except Exception:  # noqa: BLE001 - the timing loop reports it
                return None
        if self._built is None:
            return None
        layout, seed, inputs = self._built
        ctx = runner.RunContext(self.sweep, self.device, self.env, "", None, "",
                                pinned={task.name: (BundledKernel(), task.pin)})
        got = runner.prepare_one(ctx, case, task.name, layout, float("nan"), inputs, seed + 1)
        if isinstance(got, runner.ReadyStep):
            row = got.row
            return (CheckResult(row.max_abs_err, row.rel_err, True, "out")
                    if self.sweep.check.enabled else None)
        return Failure(got.status, got.message)


@dataclass
class Found:
    """What a batch found of one kernel's candidates that the timing loop takes: those not to
    time (by name), the checks of those that ran right (by name), and each run's seconds."""

    failures: dict[str, Failure] = field(default_factory=dict)
    checks: dict[str, CheckResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # each run's, where it ran


@dataclass(frozen=True)
class _Ran:
    """A candidate's outcome in the batch, and the pins it ran behind."""

    pin: object
    outcome: Failure | CheckResult
    any_pins: bool = False  # it holds whatever the pins (a dead worker, a broken context)


@dataclass
class Compiled:
    """What one batch found, per candidate (`CompileTask.key`), and notes for the user."""

    ran: dict[tuple, _Ran] = field(default_factory=dict)
    seconds: dict[tuple, float] = field(default_factory=dict)  # each run's, where it ran
    warnings: list[str] = field(default_factory=list)

    def record(self, task: CompileTask, outcome: Failure | CheckResult | None,
               seconds: float | None = None, any_pins: bool = False) -> None:
        if seconds is not None:
            self.seconds[task.key] = round(seconds, 2)
        # Out of memory among workers sharing the GPU says little about the candidate alone.
        if isinstance(outcome, CheckResult) or (outcome is not None and outcome.status != "oom"):
            self.ran[task.key] = _Ran(task.pin, outcome, any_pins)

    def found(self, tasks: list[CompileTask]) -> Found:
        """What the batch found of ``tasks`` (one kernel's candidates, pinned as the timing loop
        pins them) that holds for them: the outcomes of runs behind the same pins."""
        found = Found()
        for task in tasks:
            if task.key in self.seconds:
                found.seconds[task.name] = self.seconds[task.key]
            ran = self.ran.get(task.key)
            # Behind other pins the check ran another forward/backward pair against the
            # reference, and a failure may have been the other kernels': neither is this one's.
            if ran is None or not (ran.any_pins or ran.pin == task.pin):
                continue
            if isinstance(ran.outcome, CheckResult):
                found.checks[task.name] = ran.outcome
            else:
                found.failures[task.name] = ran.outcome
        return found


OnDone = Callable[[CompileTask], None]


class InProcess:
    """The compile phase in this process, one candidate after another."""

    def __init__(self, sweep: Sweep, env: dict, device: torch.device) -> None:
        self.compiler = Compiler(sweep, env, device)

    def compile(self, tasks: list[CompileTask], on_done: OnDone) -> Compiled:
        compiled = Compiled()
        for task in tasks:
            compiled.record(task, *self.compiler.timed_run(task))
            on_done(task)
        self.compiler.release()
        return compiled

    def close(self, graceful: bool) -> None:
        self.compiler.release()


@contextmanager
def compile_pool(sweep: Sweep, env: dict, device: torch.device,
                 workers: int) -> Iterator[InProcess | WorkerPool]:
    """The compile phase of a tune: ``workers`` processes (0: this process), ended on exit,
    at once when the block raised (Ctrl-C)."""
    pool = WorkerPool((sweep, env, device), workers) if workers else InProcess(sweep, env, device)
    graceful = False
    try:
        yield pool
        graceful = True
    finally:
        pool.close(graceful)


def _worker_main(conn: Connection, setup: tuple[Sweep, dict, torch.device, int]) -> None:
    """Receive tasks until ``None`` (``"release"`` drops the case's inputs); send
    ``("done", outcome, lost, seconds)`` for each (a Failure, a CheckResult or None), ``lost``
    when the worker exits after it (its CUDA context broken)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    sweep, env, device, threads = setup
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    compiler = Compiler(sweep, env, device)
    conn.send(("ready",))
    with contextlib.suppress(EOFError):  # the parent is gone
        for task in iter(conn.recv, None):
            if task == "release":
                compiler.release()
                continue
            outcome, seconds = compiler.timed_run(task)
            lost = isinstance(outcome, Failure) and _context_lost(device)
            conn.send(("done", outcome, lost, seconds))
            if lost:
                conn.close()
                os._exit(CONTEXT_LOST_EXIT)  # a fresh process gets a fresh CUDA context


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    ready: bool = False  # it started
    retiring: bool = False  # it exits after its task (its CUDA context broke)
    task: CompileTask | None = None
    since: float = 0.0  # when it was given its task (time.monotonic)
    overdue: bool = False  # stopped: its task ran past CANDIDATE_LIMIT_S


class WorkerPool:
    """Spawned worker processes that compile a batch of candidates."""

    def __init__(self, setup: tuple[Sweep, dict, torch.device], workers: int) -> None:
        self.setup = (*setup, worker_threads(workers))
        self.mp = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        self.pending: deque[CompileTask] = deque()
        self.gave_up = False  # no worker could start: the timing loop compiles
        for _ in range(workers):
            self._start()

    def _start(self) -> None:
        proc, ours = spawn_worker(self.mp, _worker_main, (self.setup,), "dkbench-compile",
                                  daemon=True)
        self.workers.append(_Worker(proc, ours))

    def compile(self, tasks: list[CompileTask], on_done: OnDone) -> Compiled:
        """Run every task once across the workers; back when all are done."""
        self.compiled, self.on_done = Compiled(), on_done
        self.pending.extend(tasks)
        for w in self.workers:
            self._dispatch(w)
        while self.workers and (self.pending or any(w.task for w in self.workers)):
            poll_workers(self.workers, self._drain, self._died, POLL_S)
            self._stop_overdue()
        if self.pending and not self.gave_up:
            self.gave_up = True
            self.compiled.warnings.append("no compile worker could start; the candidates "
                                          "compile as they are timed")
        while self.pending:  # left to the timing loop
            on_done(self.pending.popleft())
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send("release")
        return self.compiled

    def _dispatch(self, w: _Worker) -> None:
        """The next task to ``w`` when it started, is free and is staying."""
        if w.ready and not w.retiring and w.task is None and self.pending and w.proc.is_alive():
            w.task, w.since = self.pending.popleft(), time.monotonic()
            with contextlib.suppress(OSError):  # it died: _died records the task
                w.conn.send(w.task)

    def _drain(self, w: _Worker) -> None:
        with contextlib.suppress(EOFError, OSError):  # its end closed: _died handles it
            while w.conn.poll():
                message = w.conn.recv()
                w.ready = True
                if message[0] == "done":
                    task, w.task = w.task, None
                    self.compiled.record(task, message[1], message[3], any_pins=message[2])
                    self.on_done(task)
                    w.retiring = message[2]  # a replacement takes the next task
                self._dispatch(w)

    def _stop_overdue(self) -> None:
        """Kill each worker whose task has run past CANDIDATE_LIMIT_S; `_died` records it."""
        now = time.monotonic()
        for w in self.workers:
            if w.task is not None and not w.overdue and now - w.since > CANDIDATE_LIMIT_S:
                w.overdue = True
                w.proc.kill()

    def _died(self, w: _Worker) -> None:
        w.proc.join()
        self._drain(w)  # what it sent before it died
        w.conn.close()
        self.workers.remove(w)
        if w.task is not None:
            why = (f"still running after {CANDIDATE_LIMIT_S:.0f} s (its compile, check and "
                   "first call), so it was stopped: a kernel that never ends?" if w.overdue else
                   f"the compile worker died (exit code {describe_exit(w.proc.exitcode)}) while "
                   "running this config")
            self.compiled.record(w.task, Failure("error", why), any_pins=True)
            self.on_done(w.task)
        if w.ready:  # one that never started would not start again
            self._start()

    def close(self, graceful: bool) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        for w in self.workers:
            w.proc.join(timeout=5 if graceful else 0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self.workers.clear()
