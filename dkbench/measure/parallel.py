"""Run a sweep on several GPUs of this host: one spawned worker process per GPU (`--gpus`).

The parent keeps the pending cases, largest first, and hands the next one to whichever worker is
free. A worker runs every provider of its case (baseline first, through `runner.run_case`, so a
speedup never mixes two GPUs' measurements) and sends each row back over its pipe; only the parent
appends to results.csv, so lines never interleave and nothing is lost.

A worker that dies (segfault, `os._exit`, a CUDA error that poisons its context) costs only the
providers of its current case it had not finished: they become `error` rows saying so, and a
replacement starts on the same GPU. After `MAX_RESTARTS` replacements the GPU is dropped with a
warning and the others carry on. A worker silent for `CASE_LIMIT_S` while it runs a case (or
for `START_LIMIT_S` before it is ready) is taken as hung and killed, which is a death as above; a
worker whose parent is gone (killed, even by SIGKILL) ends itself within a second or so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import BadInputError, NoWorkersLeft
from ..results.schema import RESULTS_FILE, ResultRow, append_row
from ..spec.sweep import Case, Sweep
from . import runner
from .calibrate import Calibration
from .shard import largest_first

MAX_RESTARTS = 2  # replacements per GPU before it is dropped
POLL_S = 1.0  # how often the parent checks on workers while no message arrives
# Test hook: "CASE_ID" or "CASE_ID:PROVIDER" makes a worker os._exit(CRASH_EXIT) as it starts that
# case (or starts preparing that provider of it), as a segfault would.
CRASH_ENV = "DKBENCH_TEST_CRASH"
CRASH_EXIT = 3
# Test hook: the same forms make a worker hang (sleep for good) there instead.
HANG_ENV = "DKBENCH_TEST_HANG"
# A worker that sends nothing for this long while running a case (every provider it starts and
# every row is a message) is taken as hung; one not ready this long after its start, likewise.
CASE_LIMIT_S = 3600.0
START_LIMIT_S = 900.0
# A worker exits with this code after a case that left its CUDA context unusable.
CONTEXT_LOST_EXIT = 75

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: a GPU (by its CUDA_VISIBLE_DEVICES entry) or a CPU process."""

    label: str  # "gpu 1" or "cpu 0", used in progress and messages
    index: int  # GPU index as this process numbers them; CPU worker number
    visible: str | None  # CUDA_VISIBLE_DEVICES for the worker; None for a CPU worker

    @property
    def cuda(self) -> bool:
        return self.visible is not None

    def env(self) -> dict[str, str]:
        if self.cuda:
            return {"CUDA_VISIBLE_DEVICES": self.visible}
        # CPU workers run the kernels through Triton's interpreter and never touch a GPU.
        return {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}


def parse_gpus(text: str) -> list[Slot]:
    """``all``, a comma list of GPU indices (``0,1,3``) or ``cpu:N`` (N CPU workers, for tests)."""
    text = text.strip()
    cpu = re.fullmatch(r"cpu:(\d+)", text)
    if cpu:
        most = max(os.cpu_count() or 1, 2)  # a worker a core, and two anywhere
        if not 1 <= int(cpu[1]) <= most:
            raise BadInputError(f"--gpus {text}: cpu:N needs N from 1 to {most} (one worker "
                                "process a core of this machine)")
        return [Slot(f"cpu {i}", i, None) for i in range(int(cpu[1]))]
    parts = [p.strip() for p in text.split(",")]
    if text != "all" and not all(p.isdigit() for p in parts):
        raise BadInputError(f"--gpus {text!r}: expected all, GPU indices like 0,1,3, or cpu:N")
    count = torch.cuda.device_count()
    if count == 0:
        raise BadInputError(f"--gpus {text}: no CUDA GPU is visible (--gpus cpu:N runs N CPU "
                            "worker processes through Triton's interpreter, a testing aid)")
    indices = list(range(count)) if text == "all" else [int(p) for p in parts]
    if len(set(indices)) != len(indices):
        raise BadInputError(f"--gpus {text}: a GPU is listed twice")
    bad = [i for i in indices if i >= count]
    if bad:
        raise BadInputError(f"--gpus {text}: no GPU {bad[0]}; this machine shows GPUs "
                            f"0..{count - 1}")
    # Index i of this process is entry i of its own CUDA_VISIBLE_DEVICES, when that is set.
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    visible = [v.strip() for v in listed if v.strip()]
    return [Slot(f"gpu {i}", i, visible[i] if i < len(visible) else str(i)) for i in indices]


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to build its own RunContext (picklable)."""

    sweep: Sweep
    run_id: str
    baseline: str | None
    command: str
    baseline_ms: dict[str, float]
    cpu_threads: int
    # The parent's measurement of this machine's GPU; a worker on a GPU of another name uses none.
    calibration: Calibration | None = None


# -- the worker process --

def worker_calibration(calibration: Calibration | None,
                       device: torch.device) -> Calibration | None:
    """The parent's calibration where it describes this worker's device: a GPU of the same name."""
    if calibration is None or device.type != "cuda":
        return None
    return calibration if torch.cuda.get_device_name(device) == calibration.gpu else None


def _worker_main(conn: Connection, setup: WorkerSetup, slot: Slot) -> None:
    """Receive ``(index, case, providers)`` tasks until ``None``; send messages back on ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _end_with_parent()
    os.environ.update(slot.env())  # already so (set by the parent at spawn); kept for clarity
    from .envinfo import environment

    if slot.cuda:
        device = torch.device("cuda", 0)  # the one GPU CUDA_VISIBLE_DEVICES leaves visible
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(setup.cpu_threads)
    env = environment(device)
    ctx = runner.RunContext(setup.sweep, device, env, setup.run_id, setup.baseline, setup.command,
                            dict(setup.baseline_ms), worker_calibration(setup.calibration, device))
    crash = os.environ.get(CRASH_ENV, "").partition(":")[::2]
    hang = os.environ.get(HANG_ENV, "").partition(":")[::2]
    conn.send(("ready", env))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return  # the parent is gone
        if task is None:
            return
        index, case, providers = task

        def on_start(what: str, case: Case = case, index: int = index) -> None:
            # `what` is "NAME" or "preparing NAME" for a provider, "timing N providers ..." after
            if case.case_id == crash[0] and crash[1] in ("", what.split()[-1]):
                os._exit(CRASH_EXIT)
            if case.case_id == hang[0] and hang[1] in ("", what.split()[-1]):
                while True:
                    time.sleep(60)
            conn.send(("start", index, what))

        try:
            runner.run_case(ctx, case, providers, on_start,
                            lambda row, index=index: conn.send(("row", index, row)))
        except Exception as exc:  # noqa: BLE001 - the parent turns it into rows
            text = str(exc).strip().splitlines()
            conn.send(("failed", index, f"{type(exc).__name__}: {text[0] if text else ''}"))
        lost = _context_lost(device)
        conn.send(("done", index))
        if lost:
            conn.close()
            os._exit(CONTEXT_LOST_EXIT)  # a fresh process gets a fresh CUDA context


def _end_with_parent() -> None:
    """End this worker as soon as its parent is gone. A parent killed outright (SIGKILL, the OOM
    killer) closes its pipe, but a worker only sees that at its next receive, after its case, or
    never if the case hangs; meanwhile it holds its GPU. The parent's sentinel (a pipe only the
    parent holds open) says so at once, even if the parent died while this worker was starting."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="dkbench-parent-watch", daemon=True).start()


def _context_lost(device: torch.device) -> bool:
    """True when a sticky CUDA error (illegal address, device assert) broke this context."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        return False
    except Exception:  # noqa: BLE001 - any error here means the context is unusable
        return True


# -- the parent --

@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    """Set variables for a child about to be spawned (it copies the environment at exec)."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored (a Ctrl-C dropped) meanwhile: while workers are stopped, so that a second
    Ctrl-C cannot leave one running; a process started with it ignored keeps it so (Python
    installs its KeyboardInterrupt handler only where SIGINT is at its default). Only the main
    thread may change a signal's handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """A Ctrl-C held while a worker starts. SIGINT is blocked in this thread, and the child
    inherits the blocked mask through fork and exec, so a Ctrl-C never reaches it (nor prints its
    traceback): the parent ends it. In the parent the Ctrl-C is recorded (another thread may take
    the signal) and given to SIGINT's own handler once the start is done (KeyboardInterrupt, as a
    rule): never lost, as an ignored signal is, nor raised midway through the start. Where
    SIGINT is ignored already (`nohup`), it stays so, and the child inherits that. Off the main
    thread, or where signal masks do not exist, SIGINT is ignored meanwhile instead."""
    if threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "pthread_sigmask"):
        with _sigint_ignored():
            yield
        return
    handler = signal.getsignal(signal.SIGINT)
    if handler in (signal.SIG_IGN, None):  # ignored, or set outside Python: left as it is
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending Ctrl-C is recorded now
        signal.signal(signal.SIGINT, handler)
    if caught:
        signal.raise_signal(signal.SIGINT)  # to the handler it had, which runs here


def spawn_worker(context, target: Callable, args: tuple, name: str, *, daemon: bool,
                 env: dict[str, str] | None = None) -> tuple[mp.process.BaseProcess, Connection]:
    """Start ``target(conn, *args)`` in a process of the multiprocessing ``context`` and return
    it with this end of its duplex pipe. ``env`` is set for the child (it copies the environment
    at exec) and starts with SIGINT blocked (`_sigint_held`); the child's end of the pipe is
    closed here, so that ours sees EOF when the child dies."""
    ours, theirs = context.Pipe(duplex=True)
    proc = context.Process(target=target, args=(theirs, *args), name=name, daemon=daemon)
    with _environ(env or {}), _sigint_held():
        proc.start()
    theirs.close()
    return proc, ours


def poll_workers(workers: list, drain: Callable, died: Callable, timeout: float) -> None:
    """Wait until one of ``workers`` (each with a ``conn`` and a ``proc``) sends a message or
    ends, or ``timeout`` passes; then ``drain`` each one's messages, and give each that ended to
    ``died``."""
    wait([w.conn for w in workers] + [w.proc.sentinel for w in workers], timeout=timeout)
    for w in list(workers):
        drain(w)
        if not w.proc.is_alive():
            died(w)


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


@dataclass
class _Worker:
    slot: Slot
    proc: mp.process.BaseProcess
    conn: Connection
    env: dict | None = None  # set once the worker says it is ready
    task: tuple[int, list[str]] | None = None  # the case index and providers it is running
    got: set[str] = field(default_factory=set)  # providers of that case already recorded
    eof: bool = False
    heard: float = field(default_factory=time.monotonic)  # its start, or its last message
    stopped: str | None = None  # why the parent killed it (hung)


class _Pool:
    def __init__(self, ctx: runner.RunContext, slots: list[Slot],
                 work: list[tuple[Case, list[str]]], csv: Path, on_progress: Progress | None,
                 on_warning: Callable[[str], None] | None, max_restarts: int) -> None:
        self.ctx, self.work, self.csv = ctx, work, csv
        self.on_progress, self.on_warning, self.max_restarts = on_progress, on_warning, max_restarts
        self.total = sum(len(names) for _, names in work)
        self.rows: list[ResultRow] = []
        self.deaths: dict[str, int] = {s.label: 0 for s in slots}
        self.envs: dict[str, dict] = {}
        self.warnings: list[str] = []
        self.doing = "starting workers"  # what the progress bar says
        self.mp = mp.get_context("spawn")
        self.setup = WorkerSetup(ctx.sweep, ctx.run_id, ctx.baseline, ctx.command,
                                 dict(ctx.baseline_ms), max(1, (os.cpu_count() or 1) // len(slots)),
                                 ctx.calibration)
        self.workers: list[_Worker] = []
        try:
            for slot in slots:
                self._start(slot)
        except BaseException:  # a failed start (or Ctrl-C) leaves none of those started behind
            self.shutdown(graceful=False)
            raise
        self._progress()

    def _start(self, slot: Slot) -> None:
        # Not a daemon: torch.compile may start compile workers of its own. shutdown() ends it,
        # and should the parent die first, its end of the pipe closes and the worker returns.
        try:
            proc, ours = spawn_worker(self.mp, _worker_main, (self.setup, slot),
                                      f"dkbench-{slot.label.replace(' ', '')}", daemon=False,
                                      env=slot.env())
        except OSError as exc:  # the OS refused a process (EAGAIN, out of memory)
            raise NoWorkersLeft(f"could not start a worker process on {slot.label}: "
                                f"{exc.strerror or exc}") from None
        self.workers.append(_Worker(slot, proc, ours))

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.on_warning:
            self.on_warning(text)

    def run(self) -> list[ResultRow]:
        pending = deque(largest_first([case for case, _ in self.work]))
        while pending or any(w.task for w in self.workers):
            self._dispatch(pending)
            if not self.workers:
                break
            wait([w.proc.sentinel for w in self.workers]
                 + [w.conn for w in self.workers if not w.eof], timeout=POLL_S)
            for w in list(self.workers):
                self._drain(w)
                self._stop_if_hung(w)
                if not w.proc.is_alive():
                    self._died(w)
        if pending:
            raise NoWorkersLeft(f"{len(pending)} cases were not run: every worker was dropped "
                                "after repeated deaths")
        if self.on_progress:
            self.on_progress("done", self.total, self.total)
        return self.rows

    def _dispatch(self, pending: deque[int]) -> None:
        for w in self.workers:
            if w.env is None or w.task is not None or not pending:
                continue
            index = pending.popleft()
            case, names = self.work[index]
            try:
                w.conn.send((index, case, names))
            except OSError:
                pending.appendleft(index)  # the worker is dead; the next poll replaces it
                continue
            w.task, w.got, w.heard = (index, names), set(), time.monotonic()

    def _drain(self, w: _Worker) -> None:
        while not w.eof:
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):  # the worker closed its end: it is gone or going
                w.eof = True
                return
            w.heard = time.monotonic()
            self._handle(w, msg)

    def _stop_if_hung(self, w: _Worker) -> None:
        """Kill a worker silent past its limit; the next check of it finds it dead."""
        limit = CASE_LIMIT_S if w.task is not None else START_LIMIT_S if w.env is None else None
        if limit is None or w.stopped or time.monotonic() - w.heard < limit:
            return
        w.stopped = f"was stopped after {limit:g} s without a word from it (hung)"
        w.proc.kill()
        w.proc.join(timeout=5)

    def _handle(self, w: _Worker, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            w.env = self.envs[w.slot.label] = msg[1]
        elif kind == "start":
            self.doing = f"{w.slot.label}: {msg[2]}: {self.work[msg[1]][0].label()}"
            self._progress()
        elif kind == "row":
            w.got.add(msg[2].provider)
            self._record(msg[2])
        elif kind == "failed":
            self._fail_rest(w, f"worker on {w.slot.label}: {msg[2]}")
        elif kind == "done":
            w.task = None

    def _record(self, row: ResultRow) -> None:
        append_row(self.csv, row)
        self.rows.append(row)
        self._progress()

    def _progress(self) -> None:
        if self.on_progress:
            self.on_progress(self.doing, len(self.rows), self.total)

    def _fail_rest(self, w: _Worker, message: str) -> None:
        """Error rows for the providers of the worker's case that have no row yet."""
        if w.task is None:
            return
        index, names = w.task
        ctx = dataclasses.replace(self.ctx, env=w.env or self.ctx.env)
        for name in names:
            if name not in w.got:
                w.got.add(name)
                self._record(runner.failed_row(ctx, self.work[index][0], name, "error", message))

    def _died(self, w: _Worker) -> None:
        w.proc.join()
        code = w.proc.exitcode
        self._drain(w)  # rows it sent just before dying are still in the pipe
        w.conn.close()
        self.workers.remove(w)
        how = w.stopped or ("lost its CUDA context" if code == CONTEXT_LOST_EXIT
                            else f"died with exit code {describe_exit(code)}")
        self._fail_rest(w, f"worker on {w.slot.label} {how} while running this case")
        self.deaths[w.slot.label] += 1
        deaths = self.deaths[w.slot.label]
        if deaths > self.max_restarts:
            self.warn(f"{w.slot.label} dropped after {deaths} worker death"
                      f"{'s' * (deaths > 1)} (the last {how}); the other workers carry on")
            return
        self.warn(f"worker on {w.slot.label} {how}; starting a replacement "
                  f"({deaths} of {self.max_restarts} restarts)")
        self._start(w.slot)

    def shutdown(self, graceful: bool) -> None:
        """End every worker. Cut short (Ctrl-C, an error), first record the rows the workers have
        already sent, which would otherwise die with the pipe; a second Ctrl-C meanwhile must not
        leave a worker running, so the workers are stopped with SIGINT ignored."""
        try:
            if not graceful:
                self._salvage()
        finally:
            with _sigint_ignored():
                self._stop_all(graceful)

    def _salvage(self) -> None:
        for w in self.workers:
            try:
                self._drain(w)
            except Exception:  # noqa: BLE001 - e.g. the disk is full: the first error stands
                return

    def _stop_all(self, graceful: bool) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError):
                if graceful:
                    w.conn.send(None)
        for w in self.workers:
            w.proc.join(timeout=10 if graceful else 0.5)
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self.workers.clear()


def parent_device(slots: list[Slot]) -> torch.device:
    return torch.device("cuda", slots[0].index) if slots[0].cuda else torch.device("cpu")


def execute_parallel(sweep: Sweep, spec_text: str, plan: runner.RunPlan, slots: list[Slot],
                     on_progress: Progress | None = None,
                     on_warning: Callable[[str], None] | None = None, *,
                     extra_meta: dict | None = None,
                     max_restarts: int = MAX_RESTARTS) -> list[ResultRow]:
    """`runner.execute` spread over one worker process per slot; rows in the plan's order."""
    if not slots:
        raise BadInputError("--gpus: no GPU to run on")
    meta = {**(extra_meta or {}), "workers": [s.label for s in slots]}
    ctx, work = runner.begin_run(sweep, spec_text, plan, parent_device(slots), meta)
    if not work:  # a finished run resumed: no worker to start
        runner.finish_run(plan)
        return []
    pool = _Pool(ctx, slots, work, plan.run_dir / RESULTS_FILE, on_progress, on_warning,
                 max_restarts)
    graceful = False
    try:
        rows = pool.run()
        graceful = True
    finally:
        pool.shutdown(graceful)
    first = next((pool.envs[s.label] for s in slots if s.label in pool.envs), ctx.env)
    runner.finish_run(plan, {"environment": first, "worker_environments": pool.envs,
                             "worker_warnings": pool.warnings})
    position = {(case.case_id, name): i for i, (case, names) in enumerate(work) for name in names}
    return sorted(rows, key=lambda r: position.get((r.case_id, r.provider), len(position)))
