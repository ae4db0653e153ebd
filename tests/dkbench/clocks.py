"""A clock for `dkbench.measure.timing.measure_interleaved` that reports scripted times, so tests can put
drift, failures and exact numbers where they want them."""

from __future__ import annotations

from collections.abc import Callable


class ScriptedClock:
    """Calls each step, then reports ``duration(step, call)`` ms instead of measuring.

    ``step`` numbers the steps in the order they were first called (the order of the steps dict);
    ``call`` counts every call through the clock from 0, the clock's own time line. ``duration``
    may raise, as the step itself would. ``order`` holds the step number of each call made.
    With ``fixed_rounds``, every turn is ``fixed_turn`` (settling calls, timed calls).
    """

    label = "scripted"
    sampler = None  # no device to read (see test_telemetry for a clock that has one)

    def __init__(self, duration: Callable[[int, int], float], fixed_rounds: int | None = None,
                 fixed_turn: tuple[int, int] = (0, 1)) -> None:
        self.duration, self.fixed_rounds, self.fixed_turn = duration, fixed_rounds, fixed_turn
        self.order: list[int] = []
        self._numbers: dict[int, int] = {}

    def call(self, fn: Callable[[], object]) -> object:
        fn()
        step = self._numbers.setdefault(id(fn), len(self._numbers))
        self.order.append(step)
        return self.duration(step, len(self.order) - 1)

    def read(self, handles: list[object]) -> list[float]:
        return [float(h) for h in handles]


def drift_once(ms: list[float], at_call: int, factor: float = 2.0) -> Callable[[int, int], float]:
    """Step i takes ms[i], times `factor` from call number `at_call` on: a step change of the
    device's speed."""
    return lambda step, call: ms[step] * (factor if call >= at_call else 1.0)
