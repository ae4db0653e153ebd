"""The tune's screen: a kernel's candidates timed briefly together, only the best timed in full.

A full interleaved timing costs each candidate rep_ms / 50 rounds of TURN_MS turns (at least
MIN_ROUNDS, `measure.timing`): 0.6 s at phi-3's rep_ms of 300, most of it spent on configs far
from the best. So once a
(case, kernel)'s candidates are prepared, the screen times all of them and the default together
in a few rounds of short turns and ranks them by the median of their per-round speedups over the
default, the default among them at 1.0. The final, the full timing and the winner rule of a tune
without a screen (`winners.mark_best`), takes the default, the candidates among the best
``finalists`` of that ranking (where the default ranks there, it takes one of the places), and
every candidate within ``margin`` of the best, the default included. A winner must be clearly
faster than the default (`winners.clearly_faster`), so where the default ranks first, a
candidate well behind it could never win: only ``finalists - 1`` go on by rank, and those within
the margin of the default. The others keep their screen numbers under status "screened".

The screen's numbers are rougher than the final's: a median of three rounds, and turns too short
for every step to run at the clock it sets itself (`measure.timing` on power-capped clocks). The
margin keeps a candidate close to the leader from being dropped on that noise, and nothing wins
on screen numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..measure import metrics, runner, size_guard
from ..measure.check import random_inputs
from ..measure.timing import Measurement, Ratio, measure_interleaved
from ..results.schema import ResultRow
from ..spec.sweep import Case, Sweep
from .phases import Stopwatch
from .rows import SCREENED, TuneRow
from .space import Candidates

SCREEN_ROUNDS = 3
SCREEN_TURN_MS = 25.0
# Kept whatever its rank: a candidate whose screen time is at most 10% above the best's (the
# default's, where no candidate beat it).
SCREEN_MARGIN = 0.10
# The two places by rank (the default takes one where it ranks there), besides every one within
# the margin. Each finalist costs a full timing (0.6 s per kernel and case at phi-3's rep_ms); a close
# contender is kept by the margin, not the rank.
FINALISTS = 2


@dataclass(frozen=True)
class Screen:
    """How a tune screens: rounds of ``turn_ms`` turns (their warm-up at most one turn), then
    the candidates among the best ``finalists`` (the default ranked with them) and those within
    ``margin`` of the best, the default included, go on to the final (:func:`finalists`)."""

    finalists: int = FINALISTS
    margin: float = SCREEN_MARGIN
    rounds: int = SCREEN_ROUNDS
    turn_ms: float = SCREEN_TURN_MS

    def could_drop(self, candidates: int) -> bool:
        """Whether a screen of ``candidates`` (the default among them) may leave any out however
        they rank: more of them besides the default than ``finalists``. (With exactly that many,
        it could leave one out only where the default ranks among the best; such a kernel is
        timed in full.)"""
        return candidates - 1 > self.finalists

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Screened:
    """What the screen of one (case, kernel) found: each candidate's times and speedup over the
    default (the default's times too), those it left out of the final, the best candidate's
    speedup."""

    default: str
    times: dict[str, Measurement]
    ratios: dict[str, Ratio]
    dropped: frozenset[str]
    best: float


DEFAULT_SCREEN = Screen()


def screens(cands: Candidates, sweep: Sweep, screen: Screen | None) -> bool:
    """Whether the candidates of one kernel are screened: timed interleaved, and more of them
    than the screen keeps."""
    return screen is not None and sweep.timing.interleave and screen.could_drop(len(cands.run))


def finalists(speedups: dict[str, float], screen: Screen) -> list[str]:
    """The candidates that go on to the final with the default, in the given order, from their
    screen speedups over the default: those among the best ``screen.finalists`` of a ranking in
    which the default stands at 1.0 (ahead of those tied with it, as in the plan's order), and
    every one whose time is at most ``1 + screen.margin`` times the best's, the default's
    included."""
    # None stands for the default: no candidate's name.
    ranked = sorted([None, *speedups], key=lambda name: 1.0 if name is None else speedups[name],
                    reverse=True)  # stable: ties by order
    best = max([1.0, *speedups.values()])
    kept = set(ranked[:screen.finalists])
    kept |= {name for name in speedups if speedups[name] * (1 + screen.margin) >= best}
    return [name for name in speedups if name in kept]


def screen_steps(ctx: runner.RunContext, ready: list[runner.ReadyStep],
                 screen: Screen) -> Screened | None:
    """Time the ready steps as the screen and choose the finalists; None (all go on to the
    final) where it cannot drop any, or where the default failed or the timing raised (the final
    records why). A candidate that failed in the screen goes on to the final, which records its
    failure; so does one the screen could not pair with the default."""
    default = ctx.baseline
    steps = {r.row.provider: r.step for r in ready}
    if default not in steps or not screen.could_drop(len(steps)):
        return None
    spec = ctx.sweep.timing
    timing = spec.model_copy(update={"warmup_ms": min(spec.warmup_ms, screen.turn_ms)})
    try:
        timed = measure_interleaved(steps, timing, ctx.device, default, turn_ms=screen.turn_ms,
                                    rounds=screen.rounds,
                                    known_ms={r.row.provider: r.warm_ms for r in ready})
    except Exception:  # noqa: BLE001 - e.g. no memory for the L2 flush buffer: the final sees it
        return None
    if default in timed.errors or not timed.ratios:
        return None
    speedups = {name: ratio.median for name, ratio in timed.ratios.items()}
    kept = finalists(speedups, screen)
    return Screened(default, timed.times, timed.ratios,
                    frozenset(speedups) - frozenset(kept), max(speedups.values()))


def run_screened(ctx: runner.RunContext, case: Case, names: list[str], screen: Screen | None,
                 on_start: Callable[[str], None], on_screen: Callable[[str], None],
                 clock: Stopwatch | None = None) -> tuple[list[ResultRow], Screened | None]:
    """`runner.run_case` timed interleaved, with the screen (unless ``screen`` is None) between
    preparing the candidates (``names``, the default first) and timing them: one row per name in
    order, and what the screen found (None: it dropped none). A row the screen dropped is as
    prepared, never timed again: its numbers are in the Screened. ``on_screen`` hears once what
    the screen did; ``clock`` adds up the seconds of each phase."""
    clock = clock or Stopwatch()
    try:
        layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
        built = size_guard.too_big(case, None, ctx.device) is None
    except Exception:  # noqa: BLE001 - run_case builds it again and records why
        built = False
    if not built:
        if screen is not None:
            on_screen("not screened (the case could not be built)")
        with clock.phase("final"):
            return runner.run_case(ctx, case, names, on_start), None
    density = metrics.pattern_pairs(case, layout) / metrics.dense_pairs(case)
    seed = runner.case_seed(ctx.sweep, case)
    try:
        inputs = random_inputs(case, ctx.device, case.mode in ("bwd", "fwd_bwd"), seed)
    except Exception:  # noqa: BLE001 - as above
        if screen is not None:
            on_screen("not screened (the case's inputs could not be made)")
        with clock.phase("final"):
            return runner.run_case(ctx, case, names, on_start), None
    case_bytes = torch.cuda.memory_allocated(ctx.device) if ctx.device.type == "cuda" else 0
    prepared: list[ResultRow | runner.ReadyStep] = []
    with clock.phase("prepare"):
        for name in names:
            on_start(f"preparing {name}")
            prepared.append(runner.prepare_one(ctx, case, name, layout, density, inputs,
                                               seed + 1, case_bytes))
    ready = [p for p in prepared if isinstance(p, runner.ReadyStep)]
    found = None
    if screen is not None:
        with clock.phase("screen"):
            found = screen_steps(ctx, ready, screen)
        on_screen(f"kept {len(ready) - len(found.dropped)} of {len(ready)}" if found is not None
                  else f"not screened ({len(ready)} ready)")
    if found is not None:  # what the dropped ones hold is not the final's
        prepared = [p.row if isinstance(p, runner.ReadyStep) and p.row.provider in found.dropped
                    else p for p in prepared]
    final = [p for p in prepared if isinstance(p, runner.ReadyStep)]
    del ready
    if final:
        on_start(f"timing {len(final)} provider{'s' * (len(final) > 1)} interleaved")
        with clock.phase("final"):
            runner.time_together(ctx, case, layout, final)
    rows = [p.row if isinstance(p, runner.ReadyStep) else p for p in prepared]
    del inputs, prepared, final
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, found


def take_screen(row: TuneRow, name: str, found: Screened) -> None:
    """The screen's numbers in the row of candidate ``name``: its screen speedup, and, where the
    screen dropped it, its screen times and speedups in place of the final's, status "screened"."""
    if name == found.default:
        row.screen_speedup = 1.0
        return
    ratio = found.ratios.get(name)
    if ratio is None:
        return
    row.screen_speedup = ratio.median
    if name not in found.dropped:
        return
    timed = found.times[name]
    row.ms, row.ms_p20, row.ms_p80 = timed.ms, timed.p20, timed.p80
    row.speedup_vs_default, row.speedup_p20, row.speedup_p80 = ratio.median, ratio.p20, ratio.p80
    row.status = SCREENED
    # What it was measured against: the best, or the default where none beat it.
    best = (f"the best had {found.best:.2f}x" if found.best > 1.0
            else "none was faster than the default")
    row.message = f"screened out ({ratio.median:.2f}x the default in the screen; {best})"
