"""Interleaved timing with a scripted clock: paired ratios survive drift, only the second half of
each turn is timed, rounds rotate, a failing step drops out alone, and turns and rounds follow
the estimate and rep_ms within their bounds."""

from __future__ import annotations

import statistics

import pytest
import torch

from dkbench.measure import timing
from dkbench.measure.timing import (
    ESTIMATE_CALLS,
    INTERPRETER_REPS,
    KNOWN_TURN_SHARE,
    MAX_ROUNDS,
    MAX_TURN_CALLS,
    MIN_ROUNDS,
    TURN_MS,
    WHOLE_TURNS,
    measure_interleaved,
    plan_rounds,
    plan_turn,
    warmup_calls,
)
from dkbench.spec.sweep import Timing

from .clocks import ScriptedClock, drift_once

CPU = torch.device("cpu")


def noop() -> None:
    return None


def steps_of(*names: str) -> dict[str, object]:
    return {name: (lambda: None) for name in names}  # distinct objects, one per name


def test_paired_ratio_survives_a_drift_that_moves_the_ratio_of_medians() -> None:
    """The device doubles its times in round 10 of 20, between the two turns of that round (as a
    real clock change would land). Every other round still has base / fast = 2.5, so their median
    is exactly 2.5; each provider's own median sits on the edge of the step, and their ratio
    says 5/3."""
    # Turns of one settling and one timed call: round r is calls 4r .. 4r + 3.
    clock = ScriptedClock(drift_once([2.5, 1.0], at_call=4 * 10 + 2), fixed_rounds=20,
                          fixed_turn=(1, 1))
    got = measure_interleaved(steps_of("base", "fast"), Timing(), CPU, "base", clock=clock)
    assert not got.errors and len(got.rounds) == 20
    assert got.rounds[10] == {"base": 2.5, "fast": 2.0}  # the round the step split
    paired = got.ratios["fast"]
    assert paired.median == 2.5 and paired.samples == 20
    assert paired.p20 == paired.p80 == 2.5
    ratio_of_medians = got.times["base"].ms / got.times["fast"].ms
    assert ratio_of_medians == pytest.approx(5 / 3)  # what timing them apart would be exposed to
    assert got.times["fast"].timer == "scripted" and got.times["fast"].samples == 20
    assert "base" not in got.ratios


def test_only_the_second_part_of_a_turn_is_timed() -> None:
    """The first call of every turn reports 100 ms (the clock still settling); the timed calls
    report 1, 2 and 3 ms. Turn medians, samples and ratios see only the timed calls."""
    def duration(step: int, call: int) -> float:
        at = call % 4  # turns of four calls: one settling, three timed
        return 100.0 if at == 0 else float(at) * (step + 1)

    clock = ScriptedClock(duration, fixed_rounds=3, fixed_turn=(1, 3))
    got = measure_interleaved(steps_of("base", "x"), Timing(), CPU, "base", clock=clock)
    assert len(clock.order) == 3 * 2 * 4
    assert got.rounds == [{"base": 2.0, "x": 4.0}] * 3
    assert got.times["x"].samples == 9 and got.times["x"].ms == 4.0
    assert got.ratios["x"].median == 0.5


def test_ratio_quantiles_are_of_the_per_round_ratios() -> None:
    ms = {0: [4.0, 4.0, 4.0, 4.0, 4.0], 1: [1.0, 2.0, 4.0, 8.0, 1.0]}
    clock = ScriptedClock(lambda step, call: ms[step][call // 2], fixed_rounds=5)
    got = measure_interleaved(steps_of("base", "x"), Timing(), CPU, "base", clock=clock)
    ratios = [4.0, 2.0, 1.0, 0.5, 4.0]
    assert [r["base"] / r["x"] for r in got.rounds] == ratios
    assert got.ratios["x"].median == statistics.median(ratios) == 2.0
    assert got.ratios["x"].p20 == pytest.approx(0.9) and got.ratios["x"].p80 == 4.0


def test_rounds_rotate_the_first_step() -> None:
    clock = ScriptedClock(lambda step, call: 1.0, fixed_rounds=4, fixed_turn=(1, 1))
    measure_interleaved(steps_of("a", "b", "c"), Timing(), CPU, "a", clock=clock)
    # Each step's turn is two calls in a row.
    assert clock.order == [s for s in [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2] for _ in range(2)]


def test_a_step_that_raises_drops_out_and_the_others_carry_on() -> None:
    calls = {"a": 0, "b": 0, "c": 0}

    def step(name: str):
        def run() -> None:
            calls[name] += 1
            if name == "b" and calls[name] == 3:
                raise RuntimeError("CUDA error: an illegal memory access")
        return run

    steps = {name: step(name) for name in calls}
    clock = ScriptedClock(lambda s, call: 1.0 + s, fixed_rounds=6)
    got = measure_interleaved(steps, Timing(), CPU, "a", clock=clock)
    assert list(got.errors) == ["b"] and "illegal memory access" in str(got.errors["b"])
    assert calls == {"a": 6, "b": 3, "c": 6}  # never called after it raised
    assert sorted(got.times) == ["a", "c"] and got.times["c"].samples == 6
    assert all(set(r) == {"a", "c"} for r in got.rounds)  # its earlier samples went with it
    assert sorted(got.ratios) == ["c"] and got.ratios["c"].median == pytest.approx(1 / 3)


def test_a_failed_baseline_leaves_times_but_no_ratios() -> None:
    def broken() -> None:
        raise torch.cuda.OutOfMemoryError("Tried to allocate 2.00 GiB")

    clock = ScriptedClock(lambda s, call: 1.0, fixed_rounds=3)
    got = measure_interleaved({"base": broken, "x": noop}, Timing(), CPU, "base", clock=clock)
    assert list(got.errors) == ["base"] and got.ratios == {}
    assert got.times["x"].samples == 3


def test_a_device_error_seen_on_reading_fails_every_step() -> None:
    class Poisoned(ScriptedClock):
        def read(self, handles):
            raise RuntimeError("CUDA error: device-side assert triggered")

    got = measure_interleaved(steps_of("a", "b"), Timing(), CPU, "a",
                              clock=Poisoned(lambda s, c: 1.0, fixed_rounds=3))
    assert sorted(got.errors) == ["a", "b"] and got.times == {} and got.ratios == {}


@pytest.mark.parametrize(("estimate_ms", "want"), [
    (1.0, (50, 50)),                  # about TURN_MS of calls, half of them timed
    (30.0, (1, 2)),
    (150.0, (1, 1)),                  # a step slower than a turn still gets one of each
    (199.0, (1, 1)),
    (200.0, (0, 1)),                  # two turns long or more: its turn is one call, timed
    (5000.0, (0, 1)),
    (1e-4, (MAX_TURN_CALLS // 2, MAX_TURN_CALLS // 2)),  # microsecond steps stop at the cap
])
def test_plan_turn(estimate_ms: float, want: tuple[int, int]) -> None:
    assert TURN_MS == 100.0 and WHOLE_TURNS == 2.0
    assert plan_turn(estimate_ms) == want


@pytest.mark.parametrize(("rep_ms", "want"), [
    (20, MIN_ROUNDS), (100, MIN_ROUNDS), (300, 6), (500, 10), (1000, 20), (60000, MAX_ROUNDS)])
def test_plan_rounds(rep_ms: float, want: int) -> None:
    """Timed calls add up to about rep_ms a step (half of every turn), within the bounds."""
    assert plan_rounds(Timing(rep_ms=rep_ms)) == want


@pytest.mark.parametrize(("estimate_ms", "warmup_ms", "ran", "want"), [
    (10.0, 25.0, 0, 3), (30.0, 25.0, 0, 1), (1e-4, 25.0, 0, MAX_TURN_CALLS),
    (10.0, 25.0, 1, 2),     # the estimate's calls count: 3 wanted, 1 ran
    (10.0, 25.0, 5, 0),     # five estimate calls are 50 ms of warm calls already
    (30.0, 25.0, 1, 0),     # a step slower than warmup_ms is warm once estimated
    (1e-4, 25.0, 5, MAX_TURN_CALLS - 5)])
def test_warmup_calls(estimate_ms: float, warmup_ms: float, ran: int, want: int) -> None:
    assert warmup_calls(estimate_ms, Timing(warmup_ms=warmup_ms), ran) == want


def test_planned_turns_follow_the_estimate() -> None:
    """Without fixed rounds: one timed call of each step first, ESTIMATE_CALLS in all for a step
    faster than half a turn (a), one alone for a slower one (b); then about warmup_ms of calls
    each with the estimate's counted, then rounds of planned turns."""
    ms = [10.0, 90.0]
    clock = ScriptedClock(lambda s, call: ms[s])
    spec = Timing(warmup_ms=100, rep_ms=1000)
    got = measure_interleaved(steps_of("a", "b"), spec, CPU, "a", clock=clock)
    rounds = plan_rounds(spec)
    assert len(got.rounds) == rounds == got.ratios["b"].samples
    assert got.times["a"].samples == 5 * rounds and got.times["b"].samples == rounds
    estimate = [0, 1] + [0] * (ESTIMATE_CALLS - 1)
    warm_up = [0] * (10 - ESTIMATE_CALLS) + [1] * (2 - 1)  # 100 ms of calls, less the estimate's
    first_round = [0] * 10 + [1] * 2  # a: 5 settling + 5 timed calls; b: 1 + 1
    assert clock.order[:len(estimate) + len(warm_up) + 12] == estimate + warm_up + first_round
    assert len(clock.order) == len(estimate) + len(warm_up) + rounds * (10 + 2)
    assert got.ratios["b"].median == pytest.approx(10 / 90)


def test_a_step_slower_than_the_warm_up_is_not_called_again_before_the_rounds() -> None:
    """Steps whose estimate calls add up to warmup_ms run no warm-up calls of their own."""
    ms = [10.0, 60.0]
    clock = ScriptedClock(lambda s, call: ms[s])
    spec = Timing(warmup_ms=25, rep_ms=300)
    measure_interleaved(steps_of("a", "b"), spec, CPU, "a", clock=clock)
    estimate = [0, 1] + [0] * (ESTIMATE_CALLS - 1)
    first_round = [0] * 10 + [1] * 2  # straight into a's and b's turns
    assert clock.order[:len(estimate) + len(first_round)] == estimate + first_round


def test_a_step_two_turns_long_is_timed_without_a_settling_call() -> None:
    """b's one call is its whole turn: one estimate call, then one call a round."""
    ms = [10.0, 2 * TURN_MS]
    clock = ScriptedClock(lambda s, call: ms[s])
    spec = Timing(warmup_ms=25, rep_ms=300)
    got = measure_interleaved(steps_of("a", "b"), spec, CPU, "a", clock=clock)
    rounds = plan_rounds(spec)
    assert got.times["b"].samples == rounds and got.ratios["b"].samples == rounds
    assert clock.order.count(1) == 1 + rounds
    assert got.ratios["b"].median == pytest.approx(10 / (2 * TURN_MS))


def test_cpu_uses_the_wall_clock() -> None:
    got = measure_interleaved({"a": noop, "b": noop}, Timing(), CPU, "a")
    assert got.times["a"].timer == "interpreter-wallclock"
    assert got.times["b"].samples == len(got.rounds) == INTERPRETER_REPS
    assert all(r["a"] >= 0 and r["b"] >= 0 for r in got.rounds)


def test_no_steps() -> None:
    got = measure_interleaved({}, Timing(), CPU, None, clock=ScriptedClock(lambda s, c: 1.0))
    assert got.times == {} and got.errors == {} and got.rounds == []


def test_default_clock_by_device() -> None:
    assert isinstance(timing.default_clock(CPU), timing.WallClock)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_l2_flush_reads_its_buffer_and_writes_nothing() -> None:
    """A zero-fill would leave L2 dirty, and the timed call would pay for the write-back."""
    clock = timing.CudaClock(torch.device("cuda"))
    assert clock.flush.numel() * clock.flush.element_size() == timing.L2_FLUSH_BYTES
    clock.flush.fill_(7)
    clock.read([clock.call(lambda: None)])
    assert bool((clock.flush == 7).all())


def test_a_step_known_to_take_a_tenth_of_a_turn_runs_no_estimate_call() -> None:
    """b's time is known from an earlier warm call (the runner's peak-memory call) and is at
    least KNOWN_TURN_SHARE of a turn: it is planned from that and goes straight to the rounds, that
    call counted as its warm-up. a, known to take less, and c, not known, are estimated as
    before."""
    assert KNOWN_TURN_SHARE * TURN_MS == 10.0
    ms = [5.0, 5.0, 30.0]  # the clock numbers steps as first called: a, c, then b
    clock = ScriptedClock(lambda s, call: ms[s])
    spec = Timing(warmup_ms=25, rep_ms=300)
    got = measure_interleaved(steps_of("a", "b", "c"), spec, CPU, "a", clock=clock,
                              known_ms={"a": 5.0, "b": 30.0, "c": None})
    rounds = plan_rounds(spec)
    b_turn = sum(plan_turn(30.0))
    assert clock.order.count(2) == rounds * b_turn  # no estimate call, no warm-up call
    assert got.times["b"].samples == rounds * plan_turn(30.0)[1]
    # a and c: one call each, then ESTIMATE_CALLS - 1 more each, then their warm-up (25 ms of
    # calls, the estimate's 25 counted), before any round.
    estimate = [0, 1] + [0] * (ESTIMATE_CALLS - 1) + [1] * (ESTIMATE_CALLS - 1)
    assert clock.order[:len(estimate) + 1] == estimate + [0]  # round 0 starts with a
    assert got.ratios["b"].median == pytest.approx(5.0 / 30.0)


def test_a_known_time_plans_the_turn_even_when_it_is_off() -> None:
    """The known time plans b's turn (one settling and one timed call at 150 ms), though its
    calls now take 250 ms; what is timed is what the clock says."""
    ms = [10.0, 250.0]
    clock = ScriptedClock(lambda s, call: ms[s])
    got = measure_interleaved(steps_of("a", "b"), Timing(warmup_ms=25, rep_ms=300), CPU, "a",
                              clock=clock, known_ms={"b": 150.0})
    assert clock.order.count(1) == 2 * len(got.rounds)
    assert got.times["b"].ms == 250.0
