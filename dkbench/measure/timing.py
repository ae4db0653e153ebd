"""Timing steps: device events on a GPU, wall clock in the interpreter.

`measure` times one step alone: through `triton.testing.do_bench` (its warmup and rep are
milliseconds, and it flushes L2 before each call), or with `timing.cuda_graph` by replaying a CUDA
graph of the step captured here (no L2 flush, no launch overhead). `measure_interleaved` times a
case's providers together, in rounds of turns, so a step change of the GPU's clock (seen over
seconds) lands on every provider alike, and pairs each round's turns into ratios. The row records
which timer was used, and what NVML read of the GPU while its calls ran (`telemetry`). With
`timing.cuda_graph: [false, true]` the runner times every provider twice, its eager rows as above
and its graph rows (`NAME+graph`) by replay, each with one pass of the timing.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from ..spec.sweep import Timing
from . import telemetry
from .graphs import graph_samples
from .telemetry import Sampler, Telemetry

# In the interpreter a step takes seconds; a few repetitions check the pipeline, nothing more.
INTERPRETER_REPS = 3
# Interleaved timing runs in rounds; each round gives every step one turn of about TURN_MS and
# times only the second half of it. A power-capped GPU sets its clock by what runs: on an H100,
# cuDNN's attention alone ran at 1.50-1.58 GHz and SDPA's flash backend alone at 1.71-1.73 GHz,
# while alternating the two call by call ran both at one shared clock and moved their ratio by
# 13%. Turns of 60 ms or more, second half timed, gave the ratio measured apart within 2%. On an
# H200 60 ms was not enough: at phi-3's 8k forward, ratios to cuDNN in 60 ms turns were 1-4%
# below those timed apart (each provider alone for a second), in 100 ms turns within 1.3%.
TURN_MS = 100.0
# At least enough rounds (paired samples) for a median and p20/p80 (the 2nd and 4th of five)
# when rep_ms asks for fewer; past that rep_ms decides, so a spec's rep_ms of 300 times six
# rounds and one of 500 ten (with a floor of ten, any rep_ms up to 500 did nothing). At most so
# many calls a turn that microsecond steps, whose calls cost more in launches, L2 flushes and
# events than in the step, do not run for seconds.
MIN_ROUNDS = 5
MAX_ROUNDS = 1000
MAX_TURN_CALLS = 500
# A call at least this many turns long runs long enough at the clock it sets itself that the part
# of it at its predecessor's clock (the tens of ms of a turn's settling half) weighs little, so
# it is timed without a settling call before it, which would double the cost of the second-long
# steps of slow dense peers.
WHOLE_TURNS = 2.0
# Calls per step that estimate its time before the turns are planned (do_bench uses five too).
ESTIMATE_CALLS = 5
# A step whose time is known from an earlier warm call (`measure_interleaved`'s known_ms) and is
# at least this share of a turn is planned from that call alone: its turn is at most ten calls,
# so rounding to whole calls already moves the turn's length by up to 5%, and more calls to
# estimate it would change its plan only at the edge between two counts.
KNOWN_TURN_SHARE = 0.1
# Read before each call, so no call finds its inputs in L2 (50 MB on an H100). Read, not zeroed
# as do_bench does: a zero-fill leaves L2 full of dirty lines, and the timed call paid to write
# them back. On an H200 a batch-1, 128k-token decode step took 85.9 us after a zero-fill, 76.6
# after a read and 76.2 with no flush; cuDNN's 147.8, 140.7 and 139.3.
L2_FLUSH_BYTES = 256 * 2**20
WALLCLOCK, DO_BENCH, CUDA_GRAPH = "interpreter-wallclock", "do_bench", "cuda_graph"


@dataclass(frozen=True)
class Measurement:
    ms: float
    p20: float
    p80: float
    timer: str
    samples: int
    telemetry: Telemetry | None = None  # the GPU's clock and power while the timed calls ran


@dataclass(frozen=True)
class Ratio:
    """Median, p20 and p80 of per-round ratios (baseline's ms / this provider's ms)."""

    median: float
    p20: float
    p80: float
    samples: int


@dataclass(frozen=True)
class Interleaved:
    """What `measure_interleaved` found. A step that raised is in `errors` and nowhere else."""

    times: dict[str, Measurement]  # over every timed call
    ratios: dict[str, Ratio]  # non-baseline providers, when the baseline was timed too
    errors: dict[str, BaseException]
    rounds: list[dict[str, float]]  # one per round: provider -> median ms of its turn's timed calls


def p20_p80(samples: list[float]) -> tuple[float, float]:
    """The 20th and 80th percentiles, interpolated between the sorted samples."""
    if len(samples) == 1:  # statistics.quantiles wants two points before Python 3.13
        return samples[0], samples[0]
    quintiles = statistics.quantiles(samples, n=5, method="inclusive")
    return quintiles[0], quintiles[3]


def summarize(samples: list[float], timer: str) -> Measurement:
    return Measurement(statistics.median(samples), *p20_p80(samples), timer, len(samples))


def timer_for(timing: Timing, device: torch.device) -> str:
    """The timer `measure` uses: wall clock off CUDA (the interpreter), graph replay when the spec
    asks for `timing.cuda_graph`, else do_bench. A timing of both (``[false, true]``) times each
    row one way: give its `eager_pass()` or `graph_pass()`."""
    if timing.graph_rows:
        raise ValueError("timing.cuda_graph [false, true] times each row one way; time with "
                         "timing.eager_pass() or timing.graph_pass()")
    if device.type != "cuda":
        return WALLCLOCK
    return CUDA_GRAPH if timing.cuda_graph else DO_BENCH


def measure(fn: Callable[[], object], timing: Timing, device: torch.device) -> Measurement:
    """Median, p20 and p80 milliseconds of ``fn`` (already warmed up: compiled and tuned), with
    the GPU's telemetry over the whole measurement. Raises `graphs.CaptureError` when graph
    timing was asked for and ``fn`` cannot be captured."""
    timer = timer_for(timing, device)
    if timer == WALLCLOCK:
        samples = []
        for _ in range(INTERPRETER_REPS):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return summarize(samples, timer)
    import triton.testing

    sampler = telemetry.sampler(device)
    with sampler or contextlib.nullcontext():
        if timer == CUDA_GRAPH:
            timed = summarize(graph_samples(fn, timing, device), timer)
        else:
            timed = summarize(list(triton.testing.do_bench(
                fn, warmup=timing.warmup_ms, rep=timing.rep_ms, return_mode="all")), timer)
    return replace(timed, telemetry=sampler and telemetry.summarize(sampler.readings))


@contextlib.contextmanager
def step_stream(timing: Timing, device: torch.device) -> Iterator[None]:
    """The stream on which a step to be captured is made, warmed up and captured: one side
    stream for all three (no graph is captured on the default stream), because autograd runs a
    backward on the stream of its forward, and a `bwd` step's forward runs when the step is
    made. Off graph timing (or off CUDA), the current stream."""
    if timer_for(timing, device) != CUDA_GRAPH:
        yield
        return
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)  # the case's inputs were made on the current stream
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        current.wait_stream(side)


# -- interleaved timing --

class Clock(Protocol):
    """Times single calls for `measure_interleaved`.

    `call` runs the step once and returns a handle; `read` turns handles into milliseconds (waiting
    for the device first). `fixed_rounds` set skips the estimate and runs that many rounds of
    `fixed_turn` (settling calls, timed calls) turns; None plans both from the estimate and `Timing`.
    `sampler`, when set, reads the device throughout; `span` (asked only then, after `read`) says
    when a turn's timed calls ran on the device, on the sampler's time line, so each step gets the
    readings of its own calls.
    """

    label: str
    fixed_rounds: int | None
    fixed_turn: tuple[int, int]
    sampler: Sampler | None

    def call(self, fn: Callable[[], object]) -> object: ...

    def read(self, handles: list[object]) -> list[float]: ...

    def span(self, handles: list[object]) -> tuple[float, float] | None: ...


class CudaClock:
    """CUDA events around each call only, with L2 flushed just before it (a read of
    L2_FLUSH_BYTES, which leaves L2 holding clean lines of the flush buffer)."""

    label = "interleaved"
    fixed_rounds = None
    fixed_turn = (0, 1)  # unused: turns are planned

    def __init__(self, device: torch.device) -> None:
        # Allocated once per measurement and dropped with the clock, so it never counts in a later
        # provider's peak memory.
        self.flush = torch.zeros(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        self.sampler = telemetry.sampler(device)
        # The host queues calls far ahead of the device, so a turn's calls run on the device
        # later than the host made them: events give their device time, and this event, recorded
        # on an idle device, places that time on the host's perf_counter line.
        torch.cuda.synchronize(device)
        self.origin = torch.cuda.Event(enable_timing=True)
        self.origin.record()
        self.origin_s = time.perf_counter()
        self.origin.synchronize()

    def call(self, fn: Callable[[], object]) -> object:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush.max()  # a read of the whole buffer; the 0-d result is dropped
        start.record()
        fn()
        end.record()
        return start, end

    def read(self, handles: list[object]) -> list[float]:
        torch.cuda.synchronize(self.flush.device)
        return [start.elapsed_time(end) for start, end in handles]

    def span(self, handles: list[object]) -> tuple[float, float] | None:
        (first, _), (_, last) = handles[0], handles[-1]
        return (self.origin_s + self.origin.elapsed_time(first) / 1e3,
                self.origin_s + self.origin.elapsed_time(last) / 1e3)


class WallClock:
    """`time.perf_counter` around each call: the interpreter on the CPU, where timings mean
    nothing beyond that the pipeline runs."""

    label = WALLCLOCK
    fixed_rounds = INTERPRETER_REPS
    fixed_turn = (0, 1)
    sampler = None  # no GPU to read

    def call(self, fn: Callable[[], object]) -> object:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def read(self, handles: list[object]) -> list[float]:
        return [float(h) for h in handles]

    def span(self, handles: list[object]) -> tuple[float, float] | None:
        return None


def default_clock(device: torch.device) -> Clock:
    return CudaClock(device) if device.type == "cuda" else WallClock()


def plan_turn(estimate_ms: float, turn_ms: float = TURN_MS) -> tuple[int, int]:
    """(settling calls, timed calls) for one turn of a step of this estimated time: about
    ``turn_ms`` in all, at least one of each, at most MAX_TURN_CALLS; a call of WHOLE_TURNS
    turns or more is its turn alone, timed whole."""
    if estimate_ms >= WHOLE_TURNS * turn_ms:
        return 0, 1
    calls = min(max(2, round(turn_ms / max(estimate_ms, 1e-6))), MAX_TURN_CALLS)
    return calls // 2, calls - calls // 2


def warmup_calls(estimate_ms: float, timing: Timing, ran: int = 0) -> int:
    """Untimed calls before the rounds: about warmup_ms of calls with the ``ran`` calls that
    estimated the step counted among them (they were untimed warm calls too), at least one in
    all, at most MAX_TURN_CALLS."""
    wanted = min(max(1, math.ceil(timing.warmup_ms / max(estimate_ms, 1e-6))), MAX_TURN_CALLS)
    return max(0, wanted - ran)


def plan_rounds(timing: Timing) -> int:
    """Rounds enough that each step's timed calls add up to about rep_ms (half of each turn is
    timed), within [MIN_ROUNDS, MAX_ROUNDS]."""
    return min(max(math.ceil(timing.rep_ms / (TURN_MS / 2)), MIN_ROUNDS), MAX_ROUNDS)


def _calls(clock: Clock, steps: dict[str, Callable[[], object]], name: str, n: int,
           errors: dict[str, BaseException]) -> list[object] | None:
    """``n`` calls of step ``name``; None, with the error recorded, when one raises (the other
    steps carry on)."""
    try:
        return [clock.call(steps[name]) for _ in range(n)]
    except Exception as exc:  # noqa: BLE001 - one failing step never stops the others
        errors[name] = exc
        return None


def _read(clock: Clock, handles: list[object], active: list[str],
          errors: dict[str, BaseException]) -> list[float] | None:
    try:
        return clock.read(handles)
    except Exception as exc:  # noqa: BLE001 - an asynchronous device error: no step is to blame
        for name in active:
            errors.setdefault(name, exc)
        return None


def measure_interleaved(steps: dict[str, Callable[[], object]], timing: Timing,
                        device: torch.device, baseline: str | None = None, *,
                        clock: Clock | None = None, turn_ms: float = TURN_MS,
                        rounds: int | None = None,
                        known_ms: Mapping[str, float | None] | None = None) -> Interleaved:
    """Time ``steps`` (already warmed up) in rounds that give each a turn, and pair their times.

    Each step is first timed once, or ESTIMATE_CALLS times when faster than half a turn (to plan
    its turn), and called for about ``timing.warmup_ms`` in all (those calls included). A turn
    calls the step for about TURN_MS and times its second half, so each step runs at the clock
    it sets itself. Round r starts at step r mod n, so no step always follows the same
    neighbour. Each step gets the
    median, p20 and p80 of its timed calls; with ``baseline`` among the steps, every other step
    also gets those of the per-round ratios (baseline's turn median / this step's), which a drift
    of the device's speed between rounds leaves alone. A step that raises is reported in
    ``errors`` and left out of the later rounds, its samples dropped; the others carry on.

    ``turn_ms`` and ``rounds`` (None: :func:`plan_rounds`) plan a shorter measurement, such as
    the tuner's screen; a clock with ``fixed_rounds`` keeps its own turns and rounds.
    ``known_ms`` gives steps' times from a warm call made earlier (the runner's peak-memory call,
    after the warm-up call): a step known to take at least KNOWN_TURN_SHARE of a turn is
    planned from it and runs no call to estimate it, and that call counts among its warm-up
    calls.
    """
    if not steps:
        return Interleaved({}, {}, {}, [])
    clock = clock if clock is not None else default_clock(device)
    names = list(steps)
    errors: dict[str, BaseException] = {}
    with clock.sampler or contextlib.nullcontext():
        timed = _rounds(clock, steps, timing, errors, turn_ms, rounds, known_ms or {})
        flat = [h for this_round in timed for _, handles in this_round for h in handles]
        times = _read(clock, flat, [n for n in names if n not in errors], errors)
    readings = _telemetry(clock, timed if times is not None else [], errors)
    samples: dict[str, list[float]] = {name: [] for name in names}
    per_round: list[dict[str, float]] = []
    it = iter(times or [])
    for this_round in timed if times is not None else []:
        turn_ms = {}
        for name, handles in this_round:
            got = [next(it) for _ in handles]
            samples[name].extend(got)
            turn_ms[name] = statistics.median(got)
        # A step that failed takes its earlier samples with it.
        per_round.append({n: ms for n, ms in turn_ms.items() if n not in errors})
    return Interleaved(
        times={name: replace(summarize(samples[name], clock.label), telemetry=readings.get(name))
               for name in names if name not in errors and samples[name]},
        ratios=_ratios(per_round, names, baseline, errors),
        errors=errors, rounds=per_round)


def _rounds(clock: Clock, steps: dict[str, Callable[[], object]], timing: Timing,
            errors: dict[str, BaseException], turn_ms: float, rounds: int | None,
            known_ms: Mapping[str, float | None]) -> list[list[tuple[str, list[object]]]]:
    """Estimate and warm up each step (unless the clock fixes its turns), then run the rounds;
    per round, each step's timed handles in the order the step ran."""
    names = list(steps)
    if clock.fixed_rounds is None:
        estimates = _estimates(clock, steps, errors, turn_ms, known_ms)
        turns = {name: plan_turn(ms, turn_ms) for name, (ms, _) in estimates.items()}
        rounds = plan_rounds(timing) if rounds is None else rounds
        # About warmup_ms of untimed calls each, as do_bench, the estimate's calls among them:
        # a step slower than warmup_ms has run enough once it was estimated.
        for name, (ms, ran) in estimates.items():
            _calls(clock, steps, name, warmup_calls(ms, timing, ran), errors)
    else:
        turns = {name: clock.fixed_turn for name in names}
        rounds = clock.fixed_rounds
    timed: list[list[tuple[str, list[object]]]] = []
    for r in range(rounds):
        this_round = []
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in errors:
                continue
            settle, count = turns[name]
            if _calls(clock, steps, name, settle, errors) is None:
                continue
            handles = _calls(clock, steps, name, count, errors)
            if handles is not None:
                this_round.append((name, handles))
        timed.append(this_round)
    return timed


def _telemetry(clock: Clock, timed: list[list[tuple[str, list[object]]]],
               errors: dict[str, BaseException]) -> dict[str, Telemetry]:
    """Per step that did not fail, what the clock's sampler read during its timed calls."""
    if clock.sampler is None:
        return {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for this_round in timed:
        for name, handles in this_round:
            span = clock.span(handles)
            if span is not None and name not in errors:
                spans.setdefault(name, []).append(span)
    found = {name: telemetry.summarize(telemetry.within(clock.sampler.readings, s))
             for name, s in spans.items()}
    return {name: t for name, t in found.items() if t is not None}


def _estimates(clock: Clock, steps: dict[str, Callable[[], object]],
               errors: dict[str, BaseException], turn_ms: float,
               known_ms: Mapping[str, float | None]) -> dict[str, tuple[float, int]]:
    """Each step's time and the calls that estimated it. One timed call first: a step slower
    than half a turn is planned from it (its turn is a call or two whatever the estimate says,
    and a second-long step need not run five times to learn that); a faster one from the
    median of ESTIMATE_CALLS calls. A step whose ``known_ms`` is at least KNOWN_TURN_SHARE of a
    turn makes no call: the call that timed it is its estimate."""
    known = {n: (known_ms[n], 1) for n in steps
             if (known_ms.get(n) or 0.0) >= KNOWN_TURN_SHARE * turn_ms}
    first = {name: _calls(clock, steps, name, 1, errors) for name in steps if name not in known}
    ok = [n for n in first if first[n] is not None]
    first_ms = dict(zip(ok, _read(clock, [first[n][0] for n in ok], ok, errors) or []))
    estimates = {n: (ms, 1) for n, ms in first_ms.items()
                 if ms >= turn_ms / 2 and n not in errors}
    estimates.update(known)
    more = [n for n in first_ms if n not in estimates and n not in errors]
    extra = ESTIMATE_CALLS - 1
    handles = {name: _calls(clock, steps, name, extra, errors) for name in more}
    fine = [n for n in more if handles[n] is not None]
    times = _read(clock, [h for n in fine for h in handles[n]], fine, errors) or []
    for i, name in enumerate(fine):
        if name not in errors and times:
            estimates[name] = (statistics.median([first_ms[name],
                                                  *times[i * extra:(i + 1) * extra]]),
                               ESTIMATE_CALLS)
    return {name: estimates[name] for name in steps if name in estimates}  # in the steps' order


def _ratios(per_round: list[dict[str, float]], names: list[str], baseline: str | None,
            errors: dict[str, BaseException]) -> dict[str, Ratio]:
    if baseline is None or baseline not in names or baseline in errors:
        return {}
    out = {}
    for name in names:
        if name == baseline or name in errors:
            continue
        ratios = [s[baseline] / s[name] for s in per_round if s[name] > 0]
        if ratios:
            out[name] = Ratio(statistics.median(ratios), *p20_p80(ratios), len(ratios))
    return out


@dataclass(frozen=True)
class PeakCall:
    """One call of a warm step: the peak device memory (MB) while it ran, and its device time
    (ms, between CUDA events, L2 not flushed), which can stand for the first estimate call of
    `measure_interleaved` (``known_ms``). Off CUDA, NaN and None."""

    mb: float
    ms: float | None


def peak_memory(fn: Callable[[], object], device: torch.device,
                exclude_bytes: int = 0) -> PeakCall:
    """Peak device memory while ``fn`` runs once, inputs and outputs included, less
    ``exclude_bytes`` (memory held meanwhile that is not this step's, such as other providers'
    prepared state), and the call's time."""
    if device.type != "cuda":
        return PeakCall(float("nan"), None)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return PeakCall((torch.cuda.max_memory_allocated(device) - exclude_bytes) / 2**20,
                    start.elapsed_time(end))
