"""The p20/p80 columns are the 20th and 80th percentiles (linear interpolation between order
statistics) of the timed samples and of the per-round ratios, not another pair of quantiles."""

from __future__ import annotations

import random

import pytest
import torch

from dkbench.measure.timing import measure_interleaved, summarize
from dkbench.spec.sweep import Timing

from .clocks import ScriptedClock

CPU = torch.device("cpu")


def steps_of(*names: str) -> dict[str, object]:
    return {name: (lambda: None) for name in names}  # distinct objects, one per name


def test_summary_p20_p80_of_0_to_100_are_20_and_80() -> None:
    samples = [float(x) for x in range(101)]
    random.Random(0).shuffle(samples)  # order must not matter
    got = summarize(samples, "wall")
    assert (got.ms, got.p20, got.p80) == (50.0, 20.0, 80.0)
    assert got.samples == 101 and got.timer == "wall"


def test_summary_interpolates_between_order_statistics() -> None:
    # 1..100: the 20th percentile sits 0.8 of the way from the 20th to the 21st value.
    got = summarize([float(x) for x in range(100, 0, -1)], "wall")
    assert got.ms == 50.5
    assert got.p20 == pytest.approx(20.8, abs=1e-9) and got.p80 == pytest.approx(80.2, abs=1e-9)


def test_interleaved_times_and_ratios_report_p20_and_p80() -> None:
    """101 rounds of one timed call each: the baseline takes r ms in round r, "x" 1 ms, so x's
    per-round ratios are 0..100 and x's own times are all 1 ms."""
    clock = ScriptedClock(lambda step, call: float(call // 2) if step == 0 else 1.0,
                          fixed_rounds=101)
    got = measure_interleaved(steps_of("base", "x"), Timing(), CPU, "base", clock=clock)
    base, ratio = got.times["base"], got.ratios["x"]
    assert (base.ms, base.p20, base.p80) == (50.0, 20.0, 80.0)
    assert (ratio.median, ratio.p20, ratio.p80, ratio.samples) == (50.0, 20.0, 80.0, 101)
    assert got.times["x"].p20 == got.times["x"].p80 == 1.0
