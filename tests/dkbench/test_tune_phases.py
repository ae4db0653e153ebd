"""The tune's stopwatch: seconds per phase and the line that reports them."""

from __future__ import annotations

import pytest

from dkbench.tune import phases
from dkbench.tune.phases import Stopwatch


def test_phases_add_up_and_the_line_names_each(monkeypatch: pytest.MonkeyPatch) -> None:
    now = iter([0.0, 30.0, 30.0, 42.5, 50.0, 52.0, 60.0, 61.0])
    monkeypatch.setattr(phases.time, "perf_counter", lambda: next(now))
    clock = Stopwatch()
    with clock.phase("compile"):
        pass
    with clock.phase("prepare"):
        pass
    with clock.phase("compile"):  # a phase entered again adds to what it had
        pass
    with clock.phase("final"):
        pass
    assert clock.as_dict() == {"compile": 32.0, "prepare": 12.5, "final": 1.0}
    assert clock.line(50.0) == ("Took 50 s: compile 32 s, prepare and check 12 s, final timing "
                                "1 s, the rest 4 s.")


def test_a_phase_that_raised_still_counts() -> None:
    clock = Stopwatch()
    with pytest.raises(KeyError), clock.phase("screen"):
        raise KeyError("x")
    assert set(clock.as_dict()) == {"screen"}


def test_an_unknown_phase_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown tune phase 'timing' .phases: compile, prepare, "
                                         "screen, final."):
        with Stopwatch().phase("timing"):
            pass


def test_the_commands_start_up_counts_in_the_wall_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from dkbench import startup

    clock = Stopwatch()
    clock.seconds.update({"compile": 30.0, "final": 20.0})
    assert clock.line(60.0, 9.6) == ("Took 70 s: start-up (imports, spec, plan) 10 s, compile "
                                     "30 s, final timing 20 s, the rest 10 s.")
    monkeypatch.setattr(startup, "_started", None)
    assert startup.seconds() is None  # in-process: no start-up of its own
    startup.mark()
    assert 0.0 <= startup.seconds() < 5.0
