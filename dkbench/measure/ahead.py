"""Compile ahead: the providers that compile are prepared for their pending cases in worker
processes, all at once, before this process times anything.

Most of a first run's set-up is compiling: on an H200, 100 s of the phi-3 sweep's 122 s of
set-up went to FlexAttention (Inductor, then FA4's CuTe DSL for its flash backend) and FA4's
block-sparse path, one provider after another. Each of those compilers keeps what it built on
disk, keyed by what it compiled (Triton's cache, Inductor's FX graph cache, FA4's CuTe cache
beside dkbench's config cache, FlashInfer's JIT cache), and a later process that compiles the
same finds it there. So before the first case, one worker per (provider, mode) of the providers
that compile (`Provider.compiles`) runs the provider's whole preparation, as the run's own
set-up does (`runner.prepare_one`: prepare, check, the warm-up call), for every pending case of
that mode in the run's order. The workers inherit this process's environment, the caches'
locations included.

What the workers find is thrown away: this process prepares, checks and times every row itself,
exactly as without them, only with the compilers' caches full. A worker that fails or dies
costs only the time it took: its provider compiles here as it comes. The workers share the GPU
while they run, and nothing is timed until the last one has ended (or `LIMIT_S` stopped it).

One exception to "thrown away": a case the bundled provider is still preparing after
`CASE_LIMIT_S` (a kernel of ours that never ends; its compiles take seconds) would hang this
process too. The worker is stopped, the rest of its group goes to another, and that row is not
run here: it is an error row saying why (`Ahead.stalled`, `runner.RunContext.stalled`). The
peers' compilers may take minutes on a first use (FlashInfer's nvcc), so theirs are left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from ..names import BUNDLED_PROVIDER
from ..results.schema import ResultRow, read_meta, write_meta
from ..spec.sweep import Case, Sweep, row_provider
from . import runner
from .size_guard import GRAD_MODES
from .envinfo import environment
from .parallel import describe_exit, poll_workers, spawn_worker
from .providers import PROVIDERS

# Workers at once: one per (provider, mode), at most one per core but one (this process waits
# on them), at most this many, and at most one per WORKER_HOST_BYTES of available host memory.
MAX_WORKERS = 12
# On the H200 machine (16 cores) the phase's ten workers peaked at 2.0 GB each and 42.7 GB in all,
# most of it in Inductor's pools of compile subprocesses: min(32, cores) per process that
# compiles FlexAttention, about 0.4 GB each, 80 processes at the peak. A FlexAttention graph
# compiles a handful of Triton kernels, so a worker's pool is held to COMPILE_THREADS (unless
# TORCHINDUCTOR_COMPILE_THREADS is set; Inductor's caches do not key on it), and each worker is
# counted at WORKER_HOST_BYTES: its 2 GB and its pool.
COMPILE_THREADS = 4
WORKER_HOST_BYTES = 4 * 2**30
# The phase ends here whatever is left (its workers are stopped; what they had not compiled
# compiles in the run's own set-up).
LIMIT_S = 600.0
# The bundled provider's preparation of one case (its Triton and Gluon compiles, check, warm-up
# call) takes seconds, a minute at most with the workers sharing the cores; one still running
# after this is taken to be a kernel that never ends.
CASE_LIMIT_S = 300.0
STALL_CHECKED = (BUNDLED_PROVIDER,)  # the providers whose cases CASE_LIMIT_S applies to
POLL_S = 1.0
LOG_FILE = "compile-ahead.log"  # in the run directory
# Test hook: a provider's name makes a worker os._exit(CRASH_EXIT) as it starts that provider's
# group, as a segfault in a compiler would.
CRASH_ENV = "DKBENCH_TEST_AHEAD_CRASH"
CRASH_EXIT = 3
# Test hook: a provider's name makes a worker hang (sleep for good) as it starts that
# provider's group, as a kernel that never ends would.
HANG_ENV = "DKBENCH_TEST_AHEAD_HANG"

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Group:
    """What one worker prepares: one provider, its pending cases of one mode, in run order."""

    provider: str
    mode: str
    cases: tuple[Case, ...]

    @property
    def label(self) -> str:
        return f"{self.provider} {self.mode}"


@dataclass
class Ahead:
    """What the phase did: its wall time, its workers, and per group (by label) the seconds of
    each case prepared and what did not go right (a row status and message, or why the worker
    stopped). For meta.json and the closing line."""

    seconds: float = 0.0
    workers: int = 0
    groups: dict[str, dict] = field(default_factory=dict)
    not_started: list[str] = field(default_factory=list)  # why a worker could not be started
    # (case_id, provider) -> why, for the cases whose preparation ran past CASE_LIMIT_S: their
    # rows are not run here.
    stalled: dict[tuple[str, str], str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 2), "workers": self.workers,
                "groups": self.groups, "not_started": self.not_started,
                "stalled": [[*pair, why] for pair, why in self.stalled.items()]}


def groups_for(work: list[tuple[Case, list[str]]], device: torch.device) -> list[Group]:
    """The (provider, mode) groups of the pending work whose provider compiles and can run on
    ``device``; the modes with a backward first (they compile the most)."""
    cases: dict[tuple[str, str], list[Case]] = {}
    for case, names in work:
        for name in names:
            base, graph = row_provider(name)
            cls = PROVIDERS.get(base)
            if graph or cls is None or not cls.compiles:
                continue  # a graph row runs what its eager row compiled
            cases.setdefault((base, case.mode), []).append(case)
    usable: dict[str, bool] = {}
    found = []
    for (name, mode), listed in cases.items():
        if name not in usable:
            usable[name] = PROVIDERS[name]().unavailable(device) is None
        if usable[name]:
            found.append(Group(name, mode, tuple(listed)))
    return sorted(found, key=lambda g: g.mode not in GRAD_MODES)  # stable otherwise


def worker_count(groups: list[Group], available: int | None = None) -> int:
    """Workers for ``groups``; ``available`` host memory in bytes (None: read it, where the
    system says)."""
    available = host_memory_available() if available is None else available
    by_memory = max(1, available // WORKER_HOST_BYTES) if available else MAX_WORKERS
    return min(len(groups), max(1, (os.cpu_count() or 1) - 1), MAX_WORKERS, by_memory)


def host_memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (what can be had without swapping); None where
    there is no such file (not Linux) or it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def execute(sweep: Sweep, spec_text: str, plan: runner.RunPlan, device: torch.device,
            on_progress: Progress | None = None, *,
            extra_meta: dict | None = None) -> list[ResultRow]:
    """`runner.execute` with this phase between writing the run's meta.json and its first case;
    meta.json records what the phase did under ``compiled_ahead``."""
    baseline = sweep.baseline if sweep.baseline in plan.providers else None
    groups = planned_groups(runner.pending_work(sweep, plan, baseline), device)
    with workers_for(groups, sweep, device, plan.run_dir / LOG_FILE) as pool:
        # The workers import torch and the providers while this process calibrates the GPU
        # (begin_run); none is given a case before that has ended.
        ctx, work = runner.begin_run(sweep, spec_text, plan, device, extra_meta)
        ahead = pool.run(groups, on_progress) if pool is not None else None
    if ahead is not None:
        write_meta(plan.run_dir, {**read_meta(plan.run_dir), "compiled_ahead": ahead.as_dict()})
        ctx = dataclasses.replace(ctx, stalled=dict(ahead.stalled))
    return runner.run_work(ctx, plan, work, on_progress)


def planned_groups(work: list[tuple[Case, list[str]]], device: torch.device) -> list[Group]:
    """What the phase compiles: the groups of `groups_for`, or none off CUDA (Triton's
    interpreter compiles nothing) and where there is only one (its worker would run it alone,
    as this process would, and add its own start-up)."""
    if device.type != "cuda":
        return []
    groups = groups_for(work, device)
    return groups if len(groups) > 1 else []


def run_groups(ctx: runner.RunContext, groups: list[Group], on_progress: Progress | None = None,
               log: Path | None = None) -> Ahead:
    """Prepare each group's cases in worker processes, one group a worker at a time; what the
    workers print goes to ``log`` (appended), not over the progress bar."""
    with workers_for(groups, ctx.sweep, ctx.device, log) as pool:
        return pool.run(groups, on_progress)


@contextmanager
def workers_for(groups: list[Group], sweep: Sweep, device: torch.device,
                log: Path | None) -> Iterator[_Pool | None]:
    """Workers for ``groups`` (None when there are none), started now so that they import while
    the caller goes on, and stopped on the way out (at once when it raised: Ctrl-C)."""
    if not groups:
        yield None
        return
    workers = worker_count(groups)
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = _Pool(_Setup(sweep, device, threads, str(log) if log else None), workers)
    try:
        yield pool
    finally:
        pool.stop()


@dataclass(frozen=True)
class _Setup:
    sweep: Sweep
    device: torch.device
    threads: int
    log: str | None  # where the worker's stdout and stderr go; None: where the parent's go


def _worker_main(conn: Connection, setup: _Setup) -> None:
    """Receive groups until ``None``; for each case of each, send ``("case", index, seconds,
    status, message)`` once it is prepared, then ``("group",)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if setup.log:  # the descriptors, so that what compilers print from C lands there too
        with open(setup.log, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
    torch.set_num_threads(setup.threads)
    if setup.device.type == "cuda":
        torch.cuda.set_device(setup.device)
    ctx = runner.RunContext(setup.sweep, setup.device, environment(setup.device), "", None, "")
    conn.send(("ready",))
    with contextlib.suppress(EOFError):  # the parent is gone
        for group in iter(conn.recv, None):
            if group.provider == os.environ.get(CRASH_ENV):
                os._exit(CRASH_EXIT)
            while group.provider == os.environ.get(HANG_ENV):
                time.sleep(60)
            for index, case in enumerate(group.cases):
                started = time.perf_counter()
                status, message = _prepare(ctx, case, group.provider)
                conn.send(("case", index, time.perf_counter() - started, status, message))
            conn.send(("group",))


def _prepare(ctx: runner.RunContext, case: Case, name: str) -> tuple[str, str]:
    """Prepare ``name`` for ``case`` as the run will (same layout, seed and inputs); the row's
    status and message, or what went wrong before it."""
    try:
        layout, seed, inputs = runner.case_inputs(ctx.sweep, case, ctx.device)
        got = runner.prepare_one(ctx, case, name, layout, float("nan"), inputs, seed + 1)
        row = got.row if isinstance(got, runner.ReadyStep) else got
        return row.status, row.message
    except Exception as exc:  # noqa: BLE001 - the run's own set-up meets it again and says so
        return "error", f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    finally:
        inputs = got = None  # noqa: F841 - what the case held goes before the next one comes
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    group: Group | None = None
    index: int = 0  # the case of its group it is on
    since: float = 0.0  # when it started that case (time.perf_counter)
    overdue: bool = False  # stopped: that case ran past CASE_LIMIT_S


class _Pool:
    """Spawned workers, each taking the next group when free."""

    def __init__(self, setup: _Setup, workers: int) -> None:
        self.setup, self.count = setup, workers
        self.mp = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        self.pending: deque[Group] = deque()
        self.ahead = Ahead(workers=workers)
        self.report: Callable[[str, int], None] = lambda text, done: None
        self.done = 0
        for _ in range(workers):
            self.start()

    def run(self, groups: list[Group], on_progress: Progress | None = None) -> Ahead:
        """Every group's cases across the workers; back when all are done, the workers died or
        LIMIT_S passed."""
        total = sum(len(g.cases) for g in groups)
        report = on_progress or (lambda *args: None)
        self.report = lambda text, done: report(
            f"compiling ahead ({self.count} workers): {text}", done, total)
        self.ahead.groups = {g.label: {"cases": len(g.cases), "case_seconds": [],
                                       "problems": []} for g in groups}
        self.pending.extend(groups)
        started = time.perf_counter()
        for w in self.workers:
            self._dispatch(w)
        self.wait(started + LIMIT_S)
        for group in self.pending:  # every worker died, or none could start
            self.note(group, "not compiled ahead: no worker was left to take it")
        self.pending.clear()
        self.ahead.seconds = time.perf_counter() - started
        report(f"compiled ahead in {self.ahead.seconds:.0f} s", total, total)
        return self.ahead

    def start(self) -> None:
        # Not a daemon: a daemon may not start processes of its own, and a compiler may (stop()
        # ends every worker, whatever happens here).
        env = ({} if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ
               else {"TORCHINDUCTOR_COMPILE_THREADS": str(COMPILE_THREADS)})
        try:
            proc, ours = spawn_worker(self.mp, _worker_main, (self.setup,), "dkbench-ahead",
                                      daemon=False, env=env)
        except Exception as exc:  # noqa: BLE001 - e.g. no memory or processes left: run without
            self.ahead.not_started.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            return
        self.workers.append(_Worker(proc, ours))

    def wait(self, deadline: float) -> None:
        while self.workers and (self.pending or any(w.group for w in self.workers)):
            if time.perf_counter() >= deadline:
                for w in self.workers:
                    if w.group is not None:
                        self.note(w.group, f"stopped after {LIMIT_S:.0f} s at case "
                                            f"{w.index + 1} of {len(w.group.cases)}")
                for g in self.pending:
                    self.note(g, f"not started within {LIMIT_S:.0f} s")
                self.pending.clear()
                return
            poll_workers(self.workers, self._drain, self._died, POLL_S)
            self._stop_stalled()

    def _stop_stalled(self) -> None:
        """Kill each worker whose case of a STALL_CHECKED provider has run past CASE_LIMIT_S;
        `_died` records it."""
        now = time.perf_counter()
        for w in self.workers:
            if (w.group is not None and w.group.provider in STALL_CHECKED and not w.overdue
                    and now - w.since > CASE_LIMIT_S):
                w.overdue = True
                w.proc.kill()

    def _dispatch(self, w: _Worker) -> None:
        if w.ready and w.group is None and self.pending:
            w.group, w.index = self.pending.popleft(), 0
            self._starting(w)
            with contextlib.suppress(OSError):  # it died: _died notes the group
                w.conn.send(w.group)

    def _starting(self, w: _Worker) -> None:
        w.since = time.perf_counter()
        self.report(f"{w.group.label}: {w.group.cases[w.index].label()}", self.done)

    def _drain(self, w: _Worker) -> None:
        with contextlib.suppress(EOFError, OSError):  # its end closed: _died handles it
            while w.conn.poll():
                message = w.conn.recv()
                if message[0] == "ready":
                    w.ready = True
                elif message[0] == "case":
                    _, index, seconds, status, text = message
                    group = self.ahead.groups[w.group.label]
                    group["case_seconds"].append(round(seconds, 2))
                    if status != "ok":
                        self.note(w.group, f"{w.group.cases[index].label()}: {status}: {text}")
                    self.done += 1
                    w.index = index + 1
                    if w.index < len(w.group.cases):
                        self._starting(w)
                elif message[0] == "group":
                    w.group = None
                self._dispatch(w)

    def _died(self, w: _Worker) -> None:
        w.proc.join()
        self._drain(w)
        w.conn.close()
        self.workers.remove(w)
        if w.group is not None and w.overdue:
            case = w.group.cases[w.index]
            self.ahead.stalled[case.case_id, w.group.provider] = (
                f"not run: its preparation in the compile-ahead phase was still going after "
                f"{CASE_LIMIT_S:.0f} s and was stopped (a kernel that never ends?); "
                "--no-compile-ahead prepares it in the run itself, for up to an hour")
            self.note(w.group, f"{case.label()}: still preparing after {CASE_LIMIT_S:.0f} s, so "
                               "stopped; not run")
            self.done += 1
            rest = w.group.cases[w.index + 1:]
            if rest:  # the group's other cases go on in another worker
                self.pending.appendleft(dataclasses.replace(w.group, cases=rest))
        elif w.group is not None:
            self.note(w.group, f"the worker died (exit code {describe_exit(w.proc.exitcode)}) "
                                f"at case {w.index + 1} of {len(w.group.cases)}")
            self.done += len(w.group.cases) - w.index
        if w.ready and self.pending:  # one that never started would not start again
            self.start()

    def note(self, group: Group, text: str) -> None:
        self.ahead.groups[group.label]["problems"].append(text[:300])

    def stop(self) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        deadline = time.perf_counter() + 5
        for w in self.workers:
            w.proc.join(timeout=max(0.0, deadline - time.perf_counter()) if w.group is None
                        else 0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self.workers.clear()
