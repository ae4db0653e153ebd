"""`dkbench tune`'s screen: every candidate timed briefly with the default, the best and those
near them timed in full; the winner rule of the final unchanged; the others in tune.csv with their
screen numbers. Timings are scripted per candidate (and per round) through `ScriptedClock`, the
kernel is the reference (`fake_kernel`), so the numbers are chosen and the tests are fast."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from dkbench.measure import runner
from dkbench.measure import timing as timing_mod
from dkbench.report.tune_plots import build_tune_figures
from dkbench.results.runs import read_tune
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import Timing
from dkbench.tune import screen as screening
from dkbench.tune import tuner as tuning
from dkbench.tune.plan import plan_tune
from dkbench.tune.screen import (
    DEFAULT_SCREEN,
    SCREEN_ROUNDS,
    SCREEN_TURN_MS,
    Screen,
    finalists,
)
from kernels import LaunchConfig
from kernels.config_cache import ConfigCache
from tests.dkbench.clocks import ScriptedClock
from tests.dkbench.specs import needs_interpreter
from tests.dkbench.test_tune import (  # noqa: F401 - app, fake_kernel: fixtures
    app,
    fake_kernel,
    invoke,
    only_run_dir,
    read_rows,
    write_spec,
)

CPU = torch.device("cpu")
DEFAULT = "m32n32w4s1"  # the CPU's default config for these cases
# 3 x 2 x 2 = 12 candidates of the forward, the default among them.
SPACE = {"block_m": (16, 32, 64), "block_n": (16, 32), "num_warps": (4, 8), "num_stages": (1,)}
NAMES = [LaunchConfig(m, n, w, 1).short() for m in SPACE["block_m"] for n in SPACE["block_n"]
         for w in SPACE["num_warps"]]
ORDER = [DEFAULT] + [n for n in NAMES if n != DEFAULT]  # the plan's: the default first
SLOW = 15.0  # ms of every candidate a table leaves out
# Rounds of the scripted final (its own clock fixes them): ten, so a step can win seven and lose three.
FINAL_ROUNDS = 10


class Script:
    """The interleaved timer, scripted: each call of `measure_interleaved` with ``rounds`` given
    is the screen, the others are finals; a table gives a candidate's ms (one number, or one per
    round), or an exception it raises. Records each call: phase, names, and the plan asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, screen: dict, final: dict) -> None:
        self.tables = {"screen": screen, "final": final}
        self.calls: list[tuple[str, list[str], dict]] = []
        real = timing_mod.measure_interleaved

        def measure(steps, timing, device, baseline=None, **plan):
            phase = "screen" if plan.get("rounds") is not None else "final"
            names = list(steps)
            self.calls.append((phase, names, plan))
            table = self.tables[phase]

            def duration(step: int, call: int) -> float:
                got = table.get(names[step], SLOW)
                if isinstance(got, Exception):
                    raise got
                return got[call // len(names)] if isinstance(got, list) else got

            # One call a turn: round r is calls r*n to r*n + n - 1 (no step raises mid-round here).
            rounds = plan["rounds"] if phase == "screen" else FINAL_ROUNDS
            return real(steps, timing, device, baseline,
                        clock=ScriptedClock(duration, fixed_rounds=rounds), **plan)

        monkeypatch.setattr(screening, "measure_interleaved", measure)
        monkeypatch.setattr(runner, "measure_interleaved", measure)

    def phases(self) -> list[str]:
        return [phase for phase, _, _ in self.calls]

    def timed(self, phase: str) -> list[str]:
        (names,) = [names for p, names, _ in self.calls if p == phase]
        return names


def tune(tmp_path: Path, screen: Screen | None = DEFAULT_SCREEN, space: dict = SPACE, progress=None):
    tmp_path.mkdir(exist_ok=True)
    path = write_spec(tmp_path)
    sweep = load_spec(path)
    jobs = plan_tune(sweep, ("fwd",), CPU, space)
    return tuning.execute_tune(sweep, path.read_text(), jobs, CPU, tmp_path / "out",
                               tmp_path / "cache.json", progress, screen)


def by_name(outcome) -> dict[str, dict]:
    return {LaunchConfig(int(r["block_m"]), int(r["block_n"]), int(r["num_warps"]),
                         int(r["num_stages"])).short(): r for r in read_rows(outcome.run_dir)}


def cached(tmp_path: Path) -> list[tuple]:
    return [(e["config"], e["ms"], e["default_ms"])
            for e in ConfigCache(tmp_path / "cache.json").entries().values()]


# The true winner W is third in the screen (1.89x against X's 2.00x and Y's 1.92x): kept for the
# final only by the margin, where it is the fastest by far. Z (1.25x) is clearly slower than the
# best and is dropped, as is every candidate at SLOW.
W, X, Y, Z = "m64n32w8s1", "m64n32w4s1", "m64n16w4s1", "m16n16w4s1"
SCREEN_MS = {DEFAULT: 10.0, W: 5.3, X: 5.0, Y: 5.2, Z: 8.0}
FINAL_MS = {DEFAULT: 10.0, W: 4.0, X: 6.0, Y: 5.5, Z: 8.0}


@pytest.mark.usefixtures("fake_kernel")
def test_the_true_winner_survives_the_screen_by_the_margin_and_wins_the_final(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, SCREEN_MS, FINAL_MS)
    outcome = tune(tmp_path, Screen(finalists=2))
    assert script.phases() == ["screen", "final"]
    assert script.timed("screen") == ORDER
    # The default, the two best of the screen, and W within 10% of the best; in plan order.
    assert script.timed("final") == [DEFAULT, Y, X, W]
    (_, _, plan) = script.calls[0]
    # No peak-memory call is timed on the CPU: no step's time is known beforehand.
    assert plan == {"turn_ms": SCREEN_TURN_MS, "rounds": SCREEN_ROUNDS,
                    "known_ms": {name: None for name in ORDER}}
    rows = by_name(outcome)
    assert [n for n, r in rows.items() if r["is_best"] == "True"] == [W]
    assert float(rows[W]["speedup_vs_default"]) == pytest.approx(2.5)  # the final's
    assert float(rows[W]["screen_speedup"]) == pytest.approx(10 / 5.3)
    assert float(rows[DEFAULT]["screen_speedup"]) == 1.0
    assert {n for n, r in rows.items() if r["status"] == "ok"} == {DEFAULT, X, Y, W}
    (write,) = outcome.writes
    assert (write.config.short(), write.ms, write.default_ms) == (W, 4.0, 10.0)


@pytest.mark.usefixtures("fake_kernel")
def test_a_clearly_slower_candidate_is_dropped_with_its_screen_numbers_in_tune_csv(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, SCREEN_MS, FINAL_MS)
    outcome = tune(tmp_path, Screen(finalists=2))
    rows = by_name(outcome)
    assert len(rows) == len(NAMES)  # every candidate has its row
    z = rows[Z]
    assert z["status"] == "screened" and z["is_best"] == "False"
    assert z["message"] == "screened out (1.25x the default in the screen; the best had 2.00x)"
    assert float(z["ms"]) == float(z["ms_p20"]) == float(z["ms_p80"]) == 8.0
    assert float(z["speedup_vs_default"]) == float(z["screen_speedup"]) == pytest.approx(1.25)
    assert float(z["speedup_p20"]) == pytest.approx(1.25)
    dropped = {n for n, r in rows.items() if r["status"] == "screened"}
    assert dropped == set(NAMES) - {DEFAULT, X, Y, W}
    for name in dropped - {Z}:
        assert float(rows[name]["ms"]) == SLOW
        assert re.fullmatch(r"screened out \(0\.67x the default in the screen; the best had "
                            r"2\.00x\)", rows[name]["message"])
    # The command's table lists the finalists only, and says how many were screened out.
    (result,) = outcome.results
    assert {r.config.short() for r in result.ranked()} == {DEFAULT, X, Y, W}


@pytest.mark.usefixtures("fake_kernel")
def test_a_default_faster_than_every_candidate_sends_fewer_to_the_final(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In the screen the default is the fastest: R (0.95x) is within 10% of its time; Q (0.83x),
    # second best of the others, could never win the final and is dropped, as are those at SLOW.
    r, q = "m64n32w4s1", "m16n16w4s1"
    script = Script(monkeypatch, {DEFAULT: 10.0, r: 10.5, q: 12.0}, {DEFAULT: 10.0, r: 10.5})
    outcome = tune(tmp_path, Screen(finalists=2))
    assert script.phases() == ["screen", "final"] and script.timed("final") == [DEFAULT, r]
    rows = by_name(outcome)
    assert rows[q]["status"] == "screened" and float(rows[q]["ms"]) == 12.0
    assert rows[q]["message"] == ("screened out (0.83x the default in the screen; none was "
                                  "faster than the default)")
    assert {n for n, row in rows.items() if row["status"] == "ok"} == {DEFAULT, r}
    assert [n for n, row in rows.items() if row["is_best"] == "True"] == [DEFAULT]
    (write,) = outcome.writes
    assert (write.config.short(), write.ms, write.default_ms) == (DEFAULT, 10.0, 10.0)


@pytest.mark.usefixtures("fake_kernel")
def test_no_screen_times_every_candidate_in_full_and_caches_the_same_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, SCREEN_MS, FINAL_MS)
    tune(tmp_path / "screened", Screen(finalists=2))
    script.calls.clear()
    outcome = tune(tmp_path / "full", None)
    assert script.phases() == ["final"] and script.timed("final") == ORDER
    rows = by_name(outcome)
    assert all(r["status"] == "ok" and r["screen_speedup"] == "nan" for r in rows.values())
    assert float(rows[Z]["ms"]) == 8.0 and float(rows[W]["ms"]) == 4.0
    assert [n for n, r in rows.items() if r["is_best"] == "True"] == [W]
    assert cached(tmp_path / "full") == cached(tmp_path / "screened") == [
        (LaunchConfig(64, 32, 8, 1).as_dict(), 4.0, 10.0)]


@pytest.mark.usefixtures("fake_kernel")
def test_the_final_keeps_the_winner_rule_four_rounds_of_five(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In the final A is 2.5x faster in seven rounds of ten and slower in three: the best median,
    # but not faster in four rounds of five. B is 1.25x faster in every round: B wins, with or
    # without the screen, and the cache gets the same entry both ways.
    a, b = "m64n32w4s1", "m16n32w8s1"
    screen = {DEFAULT: 10.0, a: 5.0, b: 8.0}
    final = {DEFAULT: 10.0, a: [4.0] * 7 + [12.0] * 3, b: 8.0}
    script = Script(monkeypatch, screen, final)
    for sub, how, timed in (("screened", Screen(finalists=2), [DEFAULT, b, a]),
                            ("full", None, ORDER)):
        script.calls.clear()
        outcome = tune(tmp_path / sub, how)
        assert script.timed("final") == timed
        rows = by_name(outcome)
        assert rows[a]["status"] == rows[b]["status"] == "ok"
        assert float(rows[a]["speedup_vs_default"]) == pytest.approx(2.5)
        assert float(rows[a]["speedup_p20"]) < 1.0
        assert [n for n, r in rows.items() if r["is_best"] == "True"] == [b]
    assert cached(tmp_path / "screened") == cached(tmp_path / "full") == [
        (LaunchConfig(16, 32, 8, 1).as_dict(), 8.0, 10.0)]


@pytest.mark.usefixtures("fake_kernel")
def test_a_candidate_that_fails_in_the_screen_goes_on_to_the_final(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = "m16n16w8s1"
    script = Script(monkeypatch, {**SCREEN_MS, flaky: RuntimeError("launch failed")},
                    {**FINAL_MS, flaky: 2.0})
    outcome = tune(tmp_path, Screen(finalists=2))
    assert flaky in script.timed("final")
    rows = by_name(outcome)
    assert rows[flaky]["is_best"] == "True" and rows[flaky]["screen_speedup"] == "nan"


@pytest.mark.usefixtures("fake_kernel")
def test_a_default_that_fails_in_the_screen_leaves_every_candidate_to_the_final(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, {**SCREEN_MS, DEFAULT: RuntimeError("launch failed")}, FINAL_MS)
    outcome = tune(tmp_path, Screen(finalists=2))
    assert script.timed("final") == ORDER
    assert not [r for r in read_rows(outcome.run_dir) if r["status"] == "screened"]
    assert by_name(outcome)[W]["is_best"] == "True"


@pytest.mark.usefixtures("fake_kernel")
def test_no_screen_where_it_could_drop_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(monkeypatch, SCREEN_MS, FINAL_MS)
    small = {**SPACE, "block_m": (32, 64), "block_n": (32,)}  # 4 candidates, 3 besides the default
    seen = []
    outcome = tune(tmp_path, Screen(finalists=3), small, lambda *a: seen.append(a[0]))
    assert script.phases() == ["final"] and len(script.timed("final")) == 4
    assert "screen" not in seen
    assert {r["status"] for r in read_rows(outcome.run_dir)} == {"ok"}


@pytest.mark.usefixtures("fake_kernel")
def test_progress_shows_compiling_screening_and_measuring_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, SCREEN_MS, FINAL_MS)
    heard = []
    tune(tmp_path, Screen(finalists=2), progress=lambda *a: heard.append(a))
    assert [p for p in dict.fromkeys(p for p, *_ in heard)] == ["compile", "time", "screen"]
    screened = [(text, done, total) for p, text, done, total in heard if p == "screen"]
    assert screened[0][0].startswith(f"fwd kept 4 of {len(NAMES)}: ")
    assert screened[0][1:] == (len(NAMES), len(NAMES))
    assert screened[-1] == ("done", len(NAMES), len(NAMES))
    # Measuring: each candidate prepared, then the final (the screen is its own bar).
    timed = [text for p, text, *_ in heard if p == "time"]
    assert sum("preparing" in t for t in timed) == len(NAMES)
    assert sum("timing 4 providers interleaved" in t for t in timed) == 1


@pytest.mark.usefixtures("fake_kernel")
def test_screened_cells_are_grey_and_named_in_the_heatmap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, SCREEN_MS, FINAL_MS)
    outcome = tune(tmp_path, Screen(finalists=2))
    (figure,) = build_tune_figures(read_tune(outcome.run_dir / "tune.csv"))
    maps = {ax.get_title(): ax for ax in figure.figure.axes if ax.images}
    warps4 = maps["num_warps=4, num_stages=1"]  # BLOCK_M 16, 32, 64 by BLOCK_N 16, 32
    grid = warps4.images[0].get_array()
    assert grid.mask[0, 0]  # Z, screened out: no colour from its screen time
    assert not grid.mask[2, 0] and not grid.mask[2, 1]  # Y and X, finalists
    assert "screened" in [t.get_text() for t in warps4.texts]


# -- the choice of finalists, the plan, the CLI ------------------------------------------------


def test_finalists_are_the_best_k_and_all_within_the_margin() -> None:
    speedups = {"a": 1.00, "b": 2.00, "c": 1.83, "d": 1.81, "e": 1.90}
    assert finalists(speedups, Screen(finalists=1, margin=0.10)) == ["b", "c", "e"]
    assert finalists(speedups, Screen(finalists=2, margin=0.0)) == ["b", "e"]
    assert finalists(speedups, Screen(finalists=4, margin=0.0)) == ["b", "c", "d", "e"]
    # A tie with the best is within any margin; below it, ties go by the plan's order.
    assert finalists({"a": 1.0, "b": 1.0, "c": 1.0}, Screen(finalists=1, margin=0.0)) == [
        "a", "b", "c"]
    assert finalists({"a": 2.0, "b": 1.5, "c": 1.5}, Screen(finalists=2, margin=0.0)) == [
        "a", "b"]
    # The default ranks too, ahead of those tied with it (it is first in the plan).
    assert finalists({"a": 2.0, "b": 1.0, "c": 1.0}, Screen(finalists=2, margin=0.0)) == ["a"]
    assert finalists({}, Screen()) == []
    assert Screen(finalists=4).could_drop(6) and not Screen(finalists=4).could_drop(5)


def test_a_default_that_ranks_first_keeps_one_by_rank_and_those_near_it() -> None:
    # No candidate beats the default: it takes the first place, one other goes on by rank, and
    # every one within the margin of the default's time (none of them can win the final).
    speedups = {"a": 0.80, "b": 0.95, "c": 0.70, "d": 0.92, "e": 0.85}
    assert finalists(speedups, Screen(finalists=2, margin=0.0)) == ["b"]
    assert finalists(speedups, Screen(finalists=3, margin=0.0)) == ["b", "d"]
    assert finalists(speedups, Screen(finalists=2, margin=0.10)) == ["b", "d"]  # d: 1.012
    assert finalists(speedups, Screen(finalists=1, margin=0.10)) == ["b", "d"]
    assert finalists(speedups, Screen(finalists=1, margin=0.0)) == []
    # The default second: it takes the second place.
    assert finalists({"a": 1.5, "b": 0.95, "c": 0.9}, Screen(finalists=2, margin=0.0)) == ["a"]


def test_a_candidate_faster_than_the_default_is_the_margins_reference() -> None:
    # The best is 2x the default: the margin is 10% of its time, not of the default's, so c and
    # d, faster than the default but far behind the best, are dropped; so is b, within 10% of
    # the default's time.
    speedups = {"a": 2.0, "b": 0.95, "c": 1.5, "d": 1.1, "e": 1.85}
    assert finalists(speedups, Screen(finalists=1, margin=0.10)) == ["a", "e"]
    assert finalists(speedups, Screen(finalists=2, margin=0.10)) == ["a", "e"]
    assert finalists(speedups, Screen(finalists=3, margin=0.10)) == ["a", "c", "e"]
    # Ranked below the default, a candidate goes on only by the margin of the best.
    assert finalists({"a": 1.02, "b": 0.95}, Screen(finalists=2, margin=0.10)) == ["a", "b"]
    assert finalists({"a": 1.06, "b": 0.95}, Screen(finalists=2, margin=0.10)) == ["a"]


def test_the_screens_plan_is_short_rounds_of_short_turns() -> None:
    ms = [10.0, 5.0]
    clock = ScriptedClock(lambda s, call: ms[s])
    got = timing_mod.measure_interleaved({"a": lambda: None, "b": lambda: None},
                                         Timing(warmup_ms=10), CPU, "a", clock=clock,
                                         turn_ms=SCREEN_TURN_MS, rounds=SCREEN_ROUNDS)
    assert len(got.rounds) == SCREEN_ROUNDS
    # Turns of about 25 ms, half timed: a (10 ms) one timed call of two, b (5 ms) three of five.
    assert got.times["a"].samples == SCREEN_ROUNDS and got.times["b"].samples == 3 * SCREEN_ROUNDS
    assert got.ratios["b"].median == pytest.approx(2.0)


@needs_interpreter  # the spec runs on the CPU
def test_cli_flags_reach_the_tuner(app: typer.Typer, tmp_path: Path,  # noqa: F811
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    heard = []

    def execute_tune(sweep, spec_text, jobs, device, out, cache, on_progress, screen):
        heard.append(screen)
        return tuning.TuneOutcome(tmp_path, [], tmp_path / "c.json", [])

    monkeypatch.setattr(tuning, "execute_tune", execute_tune)
    spec = str(write_spec(tmp_path))
    for args in ([], ["--finalists", "2"], ["--no-screen", "--finalists", "2"]):
        result = CliRunner().invoke(app, ["tune", spec, *args])
        assert result.exit_code == 0, result.output
    assert heard == [Screen(), Screen(finalists=2), None]


@needs_interpreter  # --device cpu
def test_dry_run_says_which_kernels_are_screened(app: typer.Typer, tmp_path: Path) -> None:  # noqa: F811
    args = ["--dry-run", "--device", "cpu", "--block-m", "16,32,64", "--num-warps", "4,8"]
    spec = str(write_spec(tmp_path))
    screened = invoke(app, spec, *args, "--finalists", "2")
    assert screened.exit_code == 0, screened.output
    assert ("1 kernel(s) screened: those among the best 2 (the default ranked with them) and "
            "those within 10% of the best timed in full") in " ".join(screened.output.split())
    unscreened = invoke(app, spec, *args, "--no-screen")
    assert "screened" not in unscreened.output


@needs_interpreter
def test_tiny_screened_tune_on_the_interpreter(app: typer.Typer, tmp_path: Path,  # noqa: F811
                                               cache_env: Path) -> None:  # noqa: F811
    # The real path end to end: four candidates, one place by rank (the default's, where it
    # ranks first) besides those within the margin (wall-clock times of the interpreter: which
    # are dropped is not known in advance, so the rows' screen numbers say which should be).
    out = tmp_path / "results"
    result = invoke(app, str(write_spec(tmp_path)), "--device", "cpu", "--block-m", "16,32",
                    "--block-n", "16,32", "--finalists", "1", "--cache", str(cache_env),
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "screening" in result.output and "measuring" in result.output
    run_dir = only_run_dir(out)
    rows = read_rows(run_dir)
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"ok", "screened"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(float(r["screen_speedup"]) > 0 for r in rows)
    names = {LaunchConfig(int(r["block_m"]), int(r["block_n"]), 4, 1).short(): r for r in rows}
    speedups = {n: float(r["screen_speedup"]) for n, r in names.items() if n != DEFAULT}
    assert {n for n, r in names.items() if r["status"] == "ok"} == {
        DEFAULT, *finalists(speedups, Screen(finalists=1))}
    for r in rows:
        if r["status"] == "screened":
            assert float(r["ms"]) > 0 and r["message"].startswith("screened out (")
    (best,) = [r for r in ok if r["is_best"] == "True"]
    (entry,) = ConfigCache(cache_env).entries().values()
    assert entry["config"] == LaunchConfig(int(best["block_m"]), int(best["block_n"]), 4,
                                           1).as_dict()
