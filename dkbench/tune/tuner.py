"""`dkbench tune`: time launch configs of the bundled kernels per case, keep the fastest right one.

Each (case, kernel) is measured as `run` measures a case's providers, by `runner.run_case`: every
candidate config is a provider of its own name (``m64n32w4s2``), the bundled kernel with that
config pinned behind the winners of the kernels tuned before it, and the default config is the
baseline. So each candidate is prepared, checked against the reference, warmed up and timed with
the others: with ``timing.interleave`` (the default) all together in rounds, each speedup over the
default the median of per-round ratios; otherwise one after another with ``do_bench``. Before
anything is timed, every candidate of every case and kernel runs once to compile it
(`precompile`), in one batch, several at once on a GPU: each behind the defaults of the kernels
before it, as their winners are not known yet. Its check and failure hold only where the timing
loop pins the same (the kernels before it kept their defaults); elsewhere the timing loop checks
the candidate itself, its kernels loaded from Triton's disk cache. Timed interleaved, more
candidates than the screen keeps are first screened (`screen`): all of them briefly, then only
the best and those near them in full.

A config replaces the default only when it is clearly faster (`winners.clearly_faster`). Every
config becomes a row of ``tune.csv``; a failure is a row with its status, never an exception. The
winner per cache key goes to the best-config cache, which the kernels read at launch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from kernels import ConfigCache, LaunchConfig, clear_memo, layout_key

from .. import startup
from ..measure import runner, watchdog
from ..measure.envinfo import command_line, environment
from ..measure.providers.bundled import BundledKernel
from ..names import BUNDLED_PROVIDER
from ..results.schema import ResultRow, check_out_dir, read_meta, write_meta
from ..spec.sweep import INFERENCE_MODES, Case, Sweep
from ..measure.check import CheckResult
from .cache import cache_errors
from .phases import Stopwatch
from .plan import TuneJob
from .precompile import CompileTask, Failure, compile_pool, worker_count
from .rows import TUNE_FILE, append_tune_rows, take_measurement, tune_row
from .screen import DEFAULT_SCREEN, Screen, Screened, run_screened, screens, take_screen
from .space import Candidates
from .winners import CacheWrite, KernelResult, cache_winners, mark_best

# on_progress(phase, text, done, total): phase "compile" (a candidate run once, every one before
# any is timed), "screen" (one kernel's candidates screened, counted by candidate) or "time" (a
# candidate prepared, or one kernel's candidates timed together).
Progress = Callable[[str, str, int, int], None]


@dataclass
class TuneOutcome:
    run_dir: Path
    results: list[KernelResult]
    cache_path: Path
    writes: list[CacheWrite]
    warnings: list[str] = field(default_factory=list)  # for the user, from the compile phase
    took: str = ""  # where the wall time went, per phase (phases.Stopwatch.line)


def measured_case(case: Case, kernel: str) -> Case:
    """What runs ``kernel`` of a tuned case: the forward (the fp8 one for "fp8"), or the whole
    backward (both of its kernels) for "bwd" and "dq"; an inference case as it is."""
    if case.mode in INFERENCE_MODES:
        return case
    return dataclasses.replace(case, mode="fwd" if kernel in ("fwd", "fp8") else "bwd")


def pins(kernel: str, config: LaunchConfig, winners: dict[str, LaunchConfig]) -> dict:
    """What the bundled kernel pins for a candidate: it, behind the winners tuned before it."""
    return {**winners, kernel: config}


def checked(sweep: Sweep) -> Sweep:
    """The sweep with its check on: a config may win only when it is right."""
    return sweep.model_copy(update={"check": sweep.check.model_copy(update={"enabled": True})})


def compile_tasks(job: TuneJob, cands: Candidates,
                  winners: dict[str, LaunchConfig]) -> list[CompileTask]:
    """The candidates of one kernel of one case, pinned as :func:`tune_kernel` times them."""
    case = measured_case(job.case, cands.kernel)
    return [CompileTask(cands.kernel, case, config.short(), pins(cands.kernel, config, winners))
            for config in cands.run]


def compile_batch(jobs: list[TuneJob]) -> list[CompileTask]:
    """Every candidate of every job, case by case in tuning order, each kernel's behind the
    defaults of the kernels before it: what the compile phase runs before anything is timed, when
    no winner is known yet."""
    batch: list[CompileTask] = []
    for job in jobs:
        defaults: dict[str, LaunchConfig] = {}
        for cands in job.candidates:
            batch += compile_tasks(job, cands, defaults)
            defaults[cands.kernel] = cands.default
    return batch


def tune_kernel(job: TuneJob, cands: Candidates, sweep: Sweep, device: torch.device, env: dict,
                run_id: str, winners: dict[str, LaunchConfig], failed: dict[str, Failure],
                on_step: Callable[[str], None], screen: Screen | None = None,
                on_screen: Callable[[str], None] = lambda text: None,
                checks: dict[str, CheckResult] | None = None,
                clock: Stopwatch | None = None,
                on_stuck: Callable[[ResultRow], None] | None = None) -> KernelResult:
    """Measure the candidates of one kernel of one case behind the ``winners`` of the kernels
    tuned before it; those in ``failed`` (by name) keep that failure and are not measured, and
    those in ``checks`` were checked already (in the compile phase, behind the same pins). Pruned
    configs become rows too. ``on_step`` hears each step of the timing phase; where ``screen``
    applies (:func:`screens`), ``on_screen`` hears once what it did; ``clock`` adds up each
    phase. On a GPU a candidate still preparing after `watchdog.PREPARE_LIMIT_S` has its error
    row handed to ``on_stuck``, which ends the process (the call never returns)."""
    clock = clock or Stopwatch()
    kernel = cands.kernel
    tasks = compile_tasks(job, cands, winners)  # the default first: the baseline
    case, default = tasks[0].case, tasks[0].name
    names = {task.name: config for task, config in zip(tasks, cands.run)}
    ctx = runner.RunContext(sweep, device, env, run_id, default, command_line(), pinned={
        task.name: (BundledKernel(), task.pin) for task in tasks}, prechecked=dict(checks or {}))
    limit = watchdog.limit_for(device)
    if limit is not None and on_stuck is not None:
        ctx.prepare_limit_s, ctx.on_stuck = limit, on_stuck
    todo = [name for name in names if name not in failed]

    def on_start(what: str) -> None:  # "preparing NAME" (or NAME), "timing N providers ..."
        on_step(f"{kernel} {what}: {job.case.label()}")

    def screened(what: str) -> None:
        on_screen(f"{kernel} {what}: {job.case.label()}")

    found: Screened | None = None
    if not todo:
        measured = []
    elif screens(cands, sweep, screen) and screen.could_drop(len(todo)):
        measured, found = run_screened(ctx, case, todo, screen, on_start, screened, clock)
    else:
        if screens(cands, sweep, screen):  # too many failed to compile
            screened(f"not screened ({len(todo)} compiled)")
        if sweep.timing.interleave:
            measured, _ = run_screened(ctx, case, todo, None, on_start, screened, clock)
        else:
            with clock.phase("final"):  # each one prepared and timed alone
                measured = runner.run_case(ctx, case, todo, on_start)
    measured = iter(measured)
    rows = []
    for name, config in names.items():
        row = tune_row(run_id, job.case, kernel, config)
        if name in failed:
            row.status, row.message = failed[name].status, failed[name].message
        else:
            take_measurement(row, next(measured))
            if found is not None:
                take_screen(row, name, found)
        rows.append(row)
    default_row = rows[0]
    if default_row.status == "ok":
        default_row.message = "default config (reference)"
        if sweep.timing.interleave:  # paired with itself
            default_row.speedup_p20 = default_row.speedup_p80 = 1.0
    for config, reason in cands.pruned:
        row = tune_row(run_id, job.case, kernel, config)
        row.status, row.message = "unsupported", f"pruned: {reason}"
        rows.append(row)
    mark_best(rows, default_row)
    key = layout_key(kernel, device, getattr(torch, case.dtype), case.head_dim, job.layout,
                     case.seqlen)
    return KernelResult(job.case, kernel, rows, default_row, key)


def stop_stuck_tune(run_dir: Path, cache_path: Path, row: ResultRow) -> None:
    """End the tune, from the deadline's thread, at a candidate whose preparation never ended:
    meta.json says where it stopped; the winners cached so far and the rows of the kernels tuned
    before it stay."""
    try:
        write_meta(run_dir, {**read_meta(run_dir), "stuck": {
            "case_id": row.case_id, "candidate": row.provider, "why": row.message}})
    except Exception:  # noqa: BLE001 - the process ends either way
        pass
    watchdog.stop_process(
        f"error: candidate {row.provider} on case {row.case_id}: {row.message}: the tune stopped "
        f"here. The winners cached so far are in {cache_path}, the rows of the kernels tuned "
        f"before it in {run_dir / TUNE_FILE}; leave that config out (--block-m, --block-n, ...) "
        "to tune the rest")


def preflight(out: Path, cache_path: Path | None) -> ConfigCache:
    """Before anything is timed: ``out`` can take the tune directory and the cache can be written
    (a bad cache file is refused now, not after the last candidate)."""
    check_out_dir(out)
    cache = ConfigCache(cache_path)
    with cache_errors():
        cache.check_writable()
    return cache


def execute_tune(sweep: Sweep, spec_text: str, jobs: list[TuneJob], device: torch.device,
                 out: Path, cache_path: Path | None, on_progress: Progress | None = None,
                 screen: Screen | None = DEFAULT_SCREEN) -> TuneOutcome:
    """Tune every job into a new ``<out>/tune-<name>-<stamp>/`` and write the winners' cache (each
    kernel's as soon as it is tuned), each kernel's candidates screened by ``screen`` where it
    applies (None: every candidate timed in full). Raises BadInputError / CacheError before
    timing when ``out`` or the cache is not writable."""
    cache = preflight(out, cache_path)
    run_dir = runner.new_run_dir(out, f"tune-{sweep.name}")
    env = environment(device)
    modes = list(dict.fromkeys(j.case.mode for j in jobs)) or ["fwd"]
    write_meta(run_dir, {
        "run_id": run_dir.name, "kind": "tune", "spec_name": sweep.name, "name": sweep.name,
        "description": sweep.description, "command": command_line(), "mode": ", ".join(modes),
        "providers": [BUNDLED_PROVIDER], "environment": env, "spec": sweep.model_dump(mode="json"),
        "spec_text": spec_text, "cache": str(cache.path),
        "spaces": {f"{j.case.case_id}/{c.kernel}": [x.short() for x in c.run] for j in jobs
                   for c in j.candidates},
        "screen": screen.as_dict() if screen is not None and sweep.timing.interleave else None,
        "started": datetime.now(timezone.utc).isoformat()})
    report = on_progress or (lambda *args: None)
    sweep = checked(sweep)

    # Steps: every candidate compiled; every one prepared (or its failure in the compile phase
    # taken), and with interleaved timing one more per (case, kernel): the timing.
    count = sum(len(c.run) for j in jobs for c in j.candidates)
    together = 1 if sweep.timing.interleave else 0
    total = count + together * sum(len(j.candidates) for j in jobs)
    to_screen = sum(len(c.run) for j in jobs for c in j.candidates if screens(c, sweep, screen))
    compiled = done = screened = 0

    def on_compiled(task: CompileTask) -> None:
        nonlocal compiled
        compiled += 1
        report("compile", f"{task.kernel} {task.name}: {task.case.label()}", compiled, count)

    def on_step(text: str) -> None:
        nonlocal done
        report("time", text, done, total)
        done += 1

    def on_screen(cands: Candidates) -> Callable[[str], None]:  # counted by candidate
        def heard(text: str) -> None:
            nonlocal screened
            screened += len(cands.run)
            report("screen", text, screened, to_screen)
        return heard

    written: dict[str, CacheWrite] = {}

    def save(results: list[KernelResult]) -> list[CacheWrite]:
        """Cache the winners of ``results`` not cached yet as they are (one locked write); the
        winners of every key so far. A key that several cases share may change its winner as
        more of them finish (`cache_winners`)."""
        writes = cache_winners(results)
        fresh = [w for w in writes if written.get(w.key.as_str()) != w]
        if fresh:
            with cache_errors():
                cache.put_many([(w.key, w.config.as_dict(), w.ms, w.default_ms) for w in fresh])
            written.update((w.key.as_str(), w) for w in fresh)
        return writes

    results: list[KernelResult] = []
    compile_seconds: dict[str, dict[str, float]] = {}  # per case and kernel, per candidate
    clock = Stopwatch()
    started = time.perf_counter()
    startup_s = startup.seconds()  # the command's start-up, counted in the wall time it prints
    batch = compile_batch(jobs)
    report("compile", "starting", 0, count)
    # The workers end with the batch: nothing compiles after it, and their CUDA contexts and
    # threads would only take from the timing loop.
    with compile_pool(sweep, env, device, worker_count(device, len(batch))) as pool:
        with clock.phase("compile"):
            precompiled = pool.compile(batch, on_compiled)
    for job in jobs:
        winners: dict[str, LaunchConfig] = {}  # each kernel is tuned behind those before it
        for cands in job.candidates:
            found = precompiled.found(compile_tasks(job, cands, winners))
            compile_seconds[f"{job.case.case_id}/{cands.kernel}"] = found.seconds
            done += len(found.failures)  # not prepared again
            result = tune_kernel(job, cands, sweep, device, env, run_dir.name, winners,
                                 found.failures, on_step, screen, on_screen(cands),
                                 found.checks, clock,
                                 lambda row: stop_stuck_tune(run_dir, cache.path, row))
            append_tune_rows(run_dir / TUNE_FILE, result.rows)
            results.append(result)
            if result.best is not None:
                winners[cands.kernel] = result.best.config
            # Each kernel's winner is cached as soon as it is known: a tune that dies later (a
            # crash, Ctrl-C, a lost machine) keeps every winner it found.
            save(results)
    report("time", "done", total, total)
    if to_screen:
        report("screen", "done", to_screen, to_screen)
    writes = save(results)
    clear_memo()
    wall_s = time.perf_counter() - started
    write_meta(run_dir, {**read_meta(run_dir), "finished": datetime.now(timezone.utc).isoformat(),
                         "cache_writes": [w.key.as_str() for w in writes],
                         "compile_warnings": precompiled.warnings,
                         "compile_seconds": compile_seconds,
                         "seconds": {**clock.as_dict(), "wall": round(wall_s, 2),
                                     **({"startup": round(startup_s, 2)}
                                        if startup_s is not None else {})}})
    return TuneOutcome(run_dir, results, cache.path, writes, precompiled.warnings,
                       clock.line(wall_s, startup_s))
