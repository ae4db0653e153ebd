"""Run a sweep: for each case and provider, prepare, check, warm up, time, and append one row."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from triton.runtime.errors import OutOfResources

from ..errors import BadInputError
from ..results.schema import (
    RESULTS_FILE,
    ResultRow,
    append_row,
    check_out_dir,
    read_meta,
    write_meta,
)
from ..spec.sweep import (
    Case,
    Sweep,
    Timing,
    excluded_for_provider,
    graph_row_name,
    row_provider,
)
from . import metrics, size_guard, sol, telemetry, watchdog
from .calibrate import Calibration, load_or_calibrate, unavailable_reason
from .check import CheckResult, random_inputs, run_check
from .envinfo import command_line, environment
from .providers import PROVIDERS, Provider, Unsupported
from .resume import previous_baselines, resumed_rows
from .timing import Ratio, measure, measure_interleaved, peak_memory, step_stream


def resolve_device(choice: str, spec: Path | None = None) -> torch.device:
    """The device ``choice`` (auto, cuda or cpu) names here. ``spec``: the choice is that spec's
    ``device:`` key, not the --device flag, and an error names the key."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "cuda":
        if spec is not None:
            raise BadInputError(f"{spec}: device: cuda, but no CUDA GPU is visible "
                                "(torch.cuda.is_available() is False); allowed here: auto, cpu "
                                "(or give --device cpu)")
        raise BadInputError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return torch.device("cpu")


def new_run_dir(out: Path, name: str) -> Path:
    check_out_dir(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = out / f"{name}-{stamp}"
    suffix = 1
    try:  # exists() raises too, for a name longer than the file system allows
        while True:
            try:
                run_dir.mkdir(parents=True)
                return run_dir
            except FileExistsError:
                if not run_dir.exists():  # a parent in the way: not a name taken
                    raise
            # Taken: by a run started this second, maybe beside this one (--out shared), in
            # the moment between a check and the mkdir; the next name is tried, not refused.
            suffix += 1
            run_dir = out / f"{name}-{stamp}-{suffix}"
    except OSError as exc:
        raise BadInputError(f"--out {out}: cannot make the run directory {run_dir.name} there "
                            f"({exc.strerror or exc})") from None


@dataclass
class RunContext:
    """What every row of one run shares."""

    sweep: Sweep
    device: torch.device
    env: dict
    run_id: str
    baseline: str | None
    command: str
    # case_id -> the baseline's median; with graph rows beside eager ones, that of the baseline's
    # graph row too, under `baseline_key` (a graph row's speedup is over the baseline's graph row).
    baseline_ms: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None  # this GPU's measured rates: the speed-of-light columns
    # Providers measured under a name of their own instead of PROVIDERS[name]: name -> (provider,
    # the config its prepare pins). The tuner's candidates: the bundled kernel, one config pinned.
    pinned: dict[str, tuple[Provider, object]] = field(default_factory=dict)
    # Checks already run, by provider name: the same check on the same device and seeded inputs,
    # run by a tune's compile worker, so it is not run again here.
    prechecked: dict[str, CheckResult] = field(default_factory=dict)
    # (case_id, provider) -> why: preparations that never ended in a compile-ahead worker
    # (dkbench.measure.ahead.CASE_LIMIT_S), not prepared here, where they would hang the run.
    stalled: dict[tuple[str, str], str] = field(default_factory=dict)
    # A preparation in this process still going after this many seconds (None: never) is taken
    # for a call that never ends: its error row goes to ``on_stuck``, which ends the process
    # (dkbench.measure.watchdog). Set by begin_run on a GPU; armed only where on_stuck is given.
    prepare_limit_s: float | None = None
    on_stuck: Callable[[ResultRow], None] | None = None


def order_providers(names: list[str], baseline: str | None) -> list[str]:
    """The baseline first, so every other row of a case can carry its speedup when written."""
    return sorted(names, key=lambda n: n != baseline)


def make_step(mode: str, attn, *inputs) -> Callable[[], object]:
    """The timed callable: forward (any mode), backward alone (graph kept) or both."""
    if mode not in ("bwd", "fwd_bwd"):
        return lambda: attn(*inputs)
    q, k, v = inputs
    dout = torch.randn_like(q)
    if mode == "bwd":
        out = attn(q, k, v)
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    return lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), dout)


def _base_row(ctx: RunContext, case: Case, provider: str, pattern_hash: str,
              density: float) -> ResultRow:
    env = ctx.env
    return ResultRow(
        run_id=ctx.run_id, timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        gpu=env["gpu"], torch_version=env["torch"], triton_version=env["triton"],
        git_sha=env["git_sha"], interpreter=env["interpreter"], case_id=case.case_id,
        provider=provider, mode=case.mode, dtype=case.dtype, batch=case.batch, seqlen=case.seqlen,
        q_len=case.q_len, heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim,
        causal=case.causal, pattern=case.pattern.label(), pattern_hash=pattern_hash,
        block_size=case.block_size, density=density, seed=ctx.sweep.seed,
        baseline=row_baseline(ctx, provider), command=ctx.command, page_size=case.page_size)


def row_baseline(ctx: RunContext, provider: str) -> str:
    """The provider a row's speedup is over: the run's baseline; for a graph row, its graph row."""
    if not ctx.baseline:
        return ""
    return graph_row_name(ctx.baseline) if row_provider(provider)[1] else ctx.baseline


def baseline_key(case_id: str, provider: str) -> str:
    """Where `RunContext.baseline_ms` keeps the median that a row of ``provider`` is compared with:
    its case id, with the graph suffix for a graph row."""
    return graph_row_name(case_id) if row_provider(provider)[1] else case_id


def row_timing(sweep: Sweep, name: str) -> Timing:
    """How the row of ``name`` is timed: a graph row by replay; the others by the spec's timing
    (its eager half when graph rows come beside them)."""
    return sweep.timing.graph_pass() if row_provider(name)[1] else sweep.timing.eager_pass()


@dataclass
class ReadyStep:
    """A case x provider prepared, checked and warmed up, waiting to be timed."""

    row: ResultRow
    provider: Provider
    step: Callable[[], object]
    warm_ms: float | None = None  # the peak-memory call's device time; None off CUDA


def prepare_one(ctx: RunContext, case: Case, name: str, layout, density: float, inputs,
                seed: int, case_bytes: int = 0) -> ResultRow | ReadyStep:
    """Everything before timing one case x provider: availability, prepare, check, the timed step,
    one warm-up call and peak memory. A failure comes back as a finished row, never an exception.

    ``case_bytes`` is the device memory allocated once the case's inputs existed, before any
    provider was prepared.
    """
    row = _base_row(ctx, case, name, layout.hash(), density)
    stalled = ctx.stalled.get((case.case_id, row_provider(name)[0]))
    if stalled:
        row.status, row.message = "error", stalled
        return row
    provider, config = provider_for(ctx, name)
    device, sweep = ctx.device, ctx.sweep
    scale = case.sm_scale if case.sm_scale is not None else 1.0 / math.sqrt(case.head_dim)
    try:
        reason = provider.unavailable(device)
        if reason:
            raise Unsupported(reason)
        if case.mode not in provider.modes:
            raise Unsupported(f"{name} has no {case.mode} mode (it runs: "
                              f"{', '.join(provider.modes)})")
        if case.mode in ("bwd", "fwd_bwd") and not provider.supports_grad:
            raise Unsupported(f"{name} has no backward pass")
        # Refuse what cannot fit rather than swap the machine or die of it mid-sweep.
        too_big = size_guard.too_big(case, row_provider(name)[0], device,
                                     sweep.check.max_tokens if sweep.check.enabled else None)
        if too_big:
            row.status, row.message = "oom", too_big
            return row
        with watchdog.deadline(ctx.prepare_limit_s if ctx.on_stuck else None,
                               lambda: ctx.on_stuck(_stuck(row, ctx.prepare_limit_s))):
            return _prepare_and_warm(ctx, case, name, provider, config, row, layout, inputs,
                                     seed, scale, case_bytes)
    except Exception as exc:  # noqa: BLE001 - one failing row never stops a sweep
        _record_failure(row, exc, provider.refused(exc))
    return row


def _stuck(row: ResultRow, limit_s: float) -> ResultRow:
    """``row`` as the error row of a preparation that ran past ``limit_s`` (``on_stuck`` says
    what follows)."""
    row.status = "error"
    row.message = (f"still preparing after {limit_s:.0f} s (its compile, check and first call), "
                   "taken for a call that never ends")
    return row


def _prepare_and_warm(ctx: RunContext, case: Case, name: str, provider: Provider, config,
                      row: ResultRow, layout, inputs, seed: int, scale: float,
                      case_bytes: int) -> ResultRow | ReadyStep:
    """`prepare_one`'s work once the provider may run the case: prepare, check, one warm-up
    call and peak memory. Raises what the provider raises."""
    device, sweep = ctx.device, ctx.sweep
    before = _allocated(device)
    start = time.perf_counter()
    prepared = provider.prepare(case, layout, sweep, device, scale, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row.build_ms = (time.perf_counter() - start) * 1e3
    row.config, row.config_source = prepared.config, prepared.config_source
    if sweep.check.enabled:
        checked = ctx.prechecked.get(name) or run_check(provider, prepared, case, layout,
                                                        sweep, device, scale, seed)
        row.max_abs_err, row.rel_err = checked.max_abs_err, checked.rel_err
        if not checked.ok:
            row.status = "wrong"
            row.message = (f"{checked.what}: relative error {checked.rel_err:.3g} above "
                           f"{sweep.check.rtol[case.dtype]}")
            return row
        if checked.vs_bf16 is not None:  # an fp8 row: how far quantising moved the output
            what = "" if case.mode == "fwd" else (f" ({checked.vs_bf16_what}, the worst of "
                                                  "out, dq, dk, dv)")
            row.message = (f"relative error {checked.vs_bf16:.3g}{what} against the bf16 "
                           "kernel on the same inputs (rel_err: against the dequantised "
                           "reference)")
    step = make_step(case.mode, prepared.attn, *inputs)
    step()  # warm-up: compilation and autotuning stay outside the timed region
    # Providers prepared before this one are still alive (they are timed together); what they
    # hold is not this step's. With one provider alive, before == case_bytes and this is all
    # memory allocated while the call runs, inputs and outputs included.
    peak = peak_memory(step, device, before - case_bytes)
    row.peak_mem_mb = peak.mb
    row.setup_ms = (time.perf_counter() - start) * 1e3
    return ReadyStep(row, provider, step, peak.ms)


def run_one(ctx: RunContext, case: Case, name: str, layout, density: float, inputs,
            seed: int, case_bytes: int = 0) -> ResultRow:
    """Measure one case x provider alone (sequential timing); every failure becomes a row."""
    try:
        ready = prepare_one(ctx, case, name, layout, density, inputs, seed, case_bytes)
        if isinstance(ready, ResultRow):
            return ready
        try:
            timed = measure(ready.step, row_timing(ctx.sweep, name), ctx.device)
            ready.row.timer, ready.row.ms = timed.timer, timed.ms
            ready.row.ms_p20, ready.row.ms_p80 = timed.p20, timed.p80
            telemetry.record(ready.row, timed.telemetry)
            _fill_metrics(ctx, case, ready.provider, layout, ready.row)
        except Exception as exc:  # noqa: BLE001 - one failing row never stops a sweep
            _record_failure(ready.row, exc)
        return ready.row
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def time_together(ctx: RunContext, case: Case, layout, ready: list[ReadyStep]) -> None:
    """Time the ready steps of one case interleaved and fill their rows (given baseline first, so
    the others find its median); a step that failed while timed gets its error row."""
    steps = {r.row.provider: r.step for r in ready}
    baseline = ctx.baseline if ctx.baseline in steps else None
    try:
        timed = measure_interleaved(steps, ctx.sweep.timing.eager_pass(), ctx.device, baseline,
                                    known_ms={r.row.provider: r.warm_ms for r in ready})
    except Exception as exc:  # noqa: BLE001 - e.g. no memory for the L2 flush buffer
        for r in ready:
            _record_failure(r.row, exc)
        return
    for r in ready:
        name, row = r.row.provider, r.row
        if name in timed.errors:
            _record_failure(row, timed.errors[name])
            continue
        got = timed.times[name]
        row.timer, row.ms, row.ms_p20, row.ms_p80 = got.timer, got.ms, got.p20, got.p80
        telemetry.record(row, got.telemetry)
        _fill_metrics(ctx, case, r.provider, layout, row, timed.ratios.get(name))


def provider_for(ctx: RunContext, name: str) -> tuple[Provider, object]:
    """The provider measured under ``name`` and the config it pins (None: its own choice)."""
    base = row_provider(name)[0]  # a graph row runs its provider
    return ctx.pinned[base] if base in ctx.pinned else (PROVIDERS[base](), None)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _record_failure(row: ResultRow, exc: BaseException, refusal: str | None = None) -> None:
    if isinstance(exc, Unsupported) or refusal:
        row.status, row.message = "unsupported", (refusal or str(exc)).splitlines()[0][:500]
    elif isinstance(exc, torch.cuda.OutOfMemoryError):
        row.status, row.message = "oom", _first_line(exc)
    else:
        # Triton's OutOfResources: the config needs more shared memory or registers than exist.
        oom = isinstance(exc, OutOfResources) or "out of memory" in str(exc).lower()
        row.status = "oom" if oom else "error"
        row.message = f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]


def _fill_metrics(ctx: RunContext, case: Case, provider: Provider, layout, row: ResultRow,
                  paired: Ratio | None = None) -> None:
    """FLOPs, rates and the speedup of a timed row: the median of its per-round ratios to the
    baseline when the two were timed interleaved (`paired`), else the ratio of their medians."""
    pairs = metrics.computed_pairs(case, layout, provider.computes, provider.pads_inputs)
    row.flops = metrics.flops(case, pairs)
    row.tflops = metrics.tflops(row.flops, row.ms)
    row.dense_tflops = metrics.tflops(metrics.flops(case, metrics.dense_pairs(case)), row.ms)
    key = baseline_key(case.case_id, row.provider)
    if ctx.baseline and row.provider == row.baseline:
        ctx.baseline_ms[key] = row.ms
    base = ctx.baseline_ms.get(key)
    if base is not None:
        row.speedup = base / row.ms
        if paired is not None:
            row.speedup, row.speedup_p20, row.speedup_p80 = paired.median, paired.p20, paired.p80
        base_computes = provider_for(ctx, ctx.baseline)[0].computes if ctx.baseline else ""
        if provider.computes == "pattern" and base_computes == "dense":
            # Measured speedup over the ideal 1/density a perfectly sparse kernel would reach.
            row.sparsity_efficiency = row.speedup * row.density
    peak = metrics.peak_tflops(row.gpu, case.dtype) if ctx.device.type == "cuda" else None
    if peak is not None and row.tflops > peak:
        row.status = "error"
        row.message = (f"{row.tflops:.0f} TFLOP/s is above the GPU's peak {peak:.0f}: the timing "
                       "or the FLOP count is wrong")
    nbytes = sol.row_bytes(case, layout, provider.computes, provider.pads_inputs)
    row.row_bytes = nbytes
    if ctx.calibration is not None:
        row.sol_ms = sol.sol_ms(row.flops, nbytes, ctx.calibration, case.dtype)
        row.sol_pct = 100.0 * row.sol_ms / row.ms
        if row.sol_pct > 100.0:  # kept as measured: the model, not the kernel, is suspect
            note = "faster than the speed of light: check the FLOP/byte model"
            row.message = f"{row.message}; {note}" if row.message else note


@dataclass
class RunPlan:
    run_dir: Path
    cases: list[Case]
    providers: list[str]
    done: set[tuple[str, str]]
    warnings: list[str] = field(default_factory=list)  # for the user, e.g. a torn row set aside


def plan_run(sweep: Sweep, cases: list[Case], providers: list[str], out: Path,
             resume: Path | None) -> RunPlan:
    """A new run directory under ``out``, or the resumed run ``resume`` with its done rows: checked
    writable, of the same spec, and with a torn last row set aside (its case runs again)."""
    if resume is None:
        return RunPlan(new_run_dir(out, sweep.name), cases, providers, set())
    done, notes = resumed_rows(sweep, resume)
    return RunPlan(resume, cases, providers, done, notes)


def pending_work(sweep: Sweep, plan: RunPlan, baseline: str | None) -> list[tuple[Case, list[str]]]:
    """Each case with its providers still to run (baseline first), in the plan's case order; with
    `timing.cuda_graph: [false, true]`, every provider's graph row after the eager ones."""
    order = order_providers(plan.providers, baseline)
    if sweep.timing.graph_rows:
        order += [graph_row_name(name) for name in order]
    work = []
    for case in plan.cases:
        names = [n for n in order if (case.case_id, n) not in plan.done
                 and not excluded_for_provider(sweep, case, n)]
        if names:
            work.append((case, names))
    return work


def begin_run(sweep: Sweep, spec_text: str, plan: RunPlan, device: torch.device,
              extra_meta: dict | None = None) -> tuple[RunContext, list[tuple[Case, list[str]]]]:
    """Write meta.json and return the run's context with its pending work."""
    env = environment(device)
    baseline = sweep.baseline if sweep.baseline in plan.providers else None
    calibration, speed_of_light = speed_of_light_for(device)
    measured = previous_baselines(plan.run_dir, baseline)
    if baseline and sweep.timing.graph_rows:  # and the medians of its graph rows, in their keys
        twin = graph_row_name(baseline)
        measured.update({baseline_key(case_id, twin): ms
                         for case_id, ms in previous_baselines(plan.run_dir, twin).items()})
    ctx = RunContext(sweep, device, env, plan.run_dir.name, baseline, command_line(), measured,
                     calibration)
    ctx.prepare_limit_s = watchdog.limit_for(device)
    meta = {"run_id": ctx.run_id, "spec_name": sweep.name, "name": sweep.name,
            "description": sweep.description, "command": ctx.command, "providers": plan.providers,
            "baseline": baseline, "environment": env, "spec": sweep.model_dump(mode="json"),
            "spec_text": spec_text, "speed_of_light": speed_of_light,
            "telemetry": telemetry.describe(device),
            "started": datetime.now(timezone.utc).isoformat(),
            **(extra_meta or {})}
    write_meta(plan.run_dir, {**read_meta(plan.run_dir), **meta})
    return ctx, pending_work(sweep, plan, baseline)


def speed_of_light_for(device: torch.device) -> tuple[Calibration | None, dict]:
    """The device's calibration (None off CUDA, or when calibrating failed) and what meta.json
    records of it: the calibration itself, or ``{"unavailable": reason}``."""
    try:
        calibration = load_or_calibrate(device)
    except Exception as exc:  # noqa: BLE001 - a failed calibration only leaves the columns empty
        return None, {"unavailable": f"calibrating failed: {type(exc).__name__}: "
                                     f"{_first_line(exc)}"}
    if calibration is None:
        return None, {"unavailable": unavailable_reason(device) or "no calibration"}
    return calibration, calibration.as_dict()


def finish_run(plan: RunPlan, extra_meta: dict | None = None) -> None:
    # Throttling is judged against the whole run's median clock, known only now.
    telemetry.flag_throttled(plan.run_dir / RESULTS_FILE)
    write_meta(plan.run_dir, {**read_meta(plan.run_dir), **(extra_meta or {}),
                              "finished": datetime.now(timezone.utc).isoformat()})


def stop_stuck(plan: RunPlan, row: ResultRow) -> None:
    """End the run, from the deadline's thread, at a preparation that never ended: its error
    ``row`` written, meta.json saying where the run stopped, the way on printed."""
    lost = ""
    row.message += ": the run stopped here, and --resume goes on without it"
    try:
        append_row(plan.run_dir / RESULTS_FILE, row)
        write_meta(plan.run_dir, {**read_meta(plan.run_dir), "stuck": {
            "case_id": row.case_id, "provider": row.provider, "why": row.message}})
    except Exception as exc:  # noqa: BLE001 - the process ends either way
        lost = (f" (writing its error row failed: {type(exc).__name__}: {_first_line(exc)}; "
                "--resume will try it again)")
    watchdog.stop_process(
        f"error: {row.provider} on case {row.case_id}: {row.message}{lost}. Rows so far are in "
        f"{plan.run_dir}; finish the rest with `dkbench run --resume {plan.run_dir}`")


def case_seed(sweep: Sweep, case: Case) -> int:
    return (sweep.seed * 1_000_003 + int(case.case_id, 16)) % 2**31


def case_inputs(sweep: Sweep, case: Case, device: torch.device) -> tuple[object, int, tuple]:
    """The case's layout, its seed and its seeded inputs (with grads in the backward modes), as
    a run builds them for its providers: what a worker preparing the same case out of the run
    builds too."""
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    seed = case_seed(sweep, case)
    return layout, seed, random_inputs(case, device, case.mode in size_guard.GRAD_MODES, seed)


def failed_row(ctx: RunContext, case: Case, provider: str, status: str,
               message: str) -> ResultRow:
    """A row for a case x provider that was never measured (its case failed to build, its worker
    died): no layout, so no pattern hash or density."""
    row = _base_row(ctx, case, provider, "", float("nan"))
    row.status, row.message = status, message[:500]
    return row


def run_case(ctx: RunContext, case: Case, providers: list[str],
             on_start: Callable[[str], None] | None = None,
             on_row: Callable[[ResultRow], None] | None = None) -> list[ResultRow]:
    """Build the case's layout and inputs once, then measure its providers; one row each, in the
    order given.

    The serial runner and the GPU workers of `dkbench.measure.parallel` both call this; give the baseline
    first so the other rows carry its speedup. With `timing.interleave` (the default) every
    provider is prepared and warmed up first, then all are timed together and the case's rows come
    at the end; otherwise each is prepared and timed alone, its row coming as soon as it is
    measured. Graph rows (``NAME+graph``, from `timing.cuda_graph: [false, true]`) come after,
    each prepared and timed alone by graph replay. `on_start` hears what is being done (a
    provider's name, "preparing NAME", "timing N providers interleaved"); `on_row` sees each row.
    """
    rows: list[ResultRow] = []

    def emit(row: ResultRow) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    try:
        layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
        density = metrics.pattern_pairs(case, layout) / metrics.dense_pairs(case)
        seed = case_seed(ctx.sweep, case)
        too_big = size_guard.too_big(case, None, ctx.device)
        if too_big:  # the case's own tensors cannot fit: no provider is tried
            for name in providers:
                emit(failed_row(ctx, case, name, "oom", too_big))
            return rows
        inputs = random_inputs(case, ctx.device, case.mode in ("bwd", "fwd_bwd"), seed)
    except Exception as exc:  # noqa: BLE001 - one failing case never stops a sweep
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        message = f"building the case failed: {type(exc).__name__}: {_first_line(exc)}"
        for name in providers:
            emit(failed_row(ctx, case, name, "oom" if oom else "error", message))
        return rows
    case_bytes = _allocated(ctx.device)
    eager = [name for name in providers if not row_provider(name)[1]]
    alone = [name for name in providers if row_provider(name)[1]]  # graph rows: one at a time
    if ctx.sweep.timing.interleave:
        for row in _interleaved_rows(ctx, case, eager, layout, density, inputs, seed,
                                     case_bytes, on_start):
            emit(row)
    else:
        alone = eager + alone
    for name in alone:
        if on_start:
            on_start(name)
        with step_stream(row_timing(ctx.sweep, name), ctx.device):
            row = run_one(ctx, case, name, layout, density, inputs, seed + 1, case_bytes)
        emit(row)
    del inputs
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _interleaved_rows(ctx: RunContext, case: Case, providers: list[str], layout, density: float,
                      inputs, seed: int, case_bytes: int,
                      on_start: Callable[[str], None] | None) -> list[ResultRow]:
    """Prepare every provider, then time the ready ones together; rows in provider order. The
    prepared state of all of them lives until this returns."""
    prepared: list[ResultRow | ReadyStep] = []
    for name in providers:
        if on_start:
            on_start(f"preparing {name}")
        prepared.append(prepare_one(ctx, case, name, layout, density, inputs, seed + 1,
                                    case_bytes))
    ready = [p for p in prepared if isinstance(p, ReadyStep)]
    if ready:
        if on_start:
            on_start(f"timing {len(ready)} provider{'s' * (len(ready) > 1)} interleaved")
        time_together(ctx, case, layout, ready)
    return [p.row if isinstance(p, ReadyStep) else p for p in prepared]


def execute(sweep: Sweep, spec_text: str, plan: RunPlan, device: torch.device,
            on_progress: Callable[[str, int, int], None] | None = None, *,
            extra_meta: dict | None = None) -> list[ResultRow]:
    """Run every pending case x provider of the plan, appending rows as they are measured."""
    ctx, work = begin_run(sweep, spec_text, plan, device, extra_meta)
    return run_work(ctx, plan, work, on_progress)


def run_work(ctx: RunContext, plan: RunPlan, work: list[tuple[Case, list[str]]],
             on_progress: Callable[[str, int, int], None] | None = None) -> list[ResultRow]:
    """`execute` after `begin_run`: measure the pending ``work``, then finish the run."""
    rows: list[ResultRow] = []
    total = sum(len(names) for _, names in work)

    def on_row(row: ResultRow) -> None:
        append_row(plan.run_dir / RESULTS_FILE, row)
        rows.append(row)

    ctx.on_stuck = lambda row: stop_stuck(plan, row)
    for case, names in work:
        def on_start(what: str, case: Case = case) -> None:
            if on_progress:
                on_progress(f"{what}: {case.label()}", len(rows), total)

        run_case(ctx, case, names, on_start, on_row)
    if on_progress:
        on_progress("done", total, total)
    finish_run(plan)
    return rows
