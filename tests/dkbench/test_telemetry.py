"""Telemetry: NVML read through a fake `pynvml`, the sampler thread, the per-step readings of an
interleaved timing, the median/min math, the throttle flag written into results.csv, and the
paths without NVML or a GPU."""

from __future__ import annotations

import math
import sys
import threading
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dkbench.measure import runner, telemetry
from dkbench.measure.telemetry import (
    Reading,
    Sampler,
    flag_throttled,
    open_reader,
    summarize,
    throttle_note,
    throttle_notes,
    with_note,
    within,
)
from dkbench.measure.timing import measure_interleaved
from dkbench.results.schema import RESULTS_FILE, ResultRow, append_row, read_meta, read_results
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import Timing, expand

from .clocks import ScriptedClock
from .specs import write_spec

CPU = torch.device("cpu")
GPU0 = torch.device("cuda", 0)  # a device object only: nothing here touches a GPU


class NVMLError(Exception):
    pass


def fake_pynvml(clocks: list[float], power_mw: float = 350_000.0, temp: float = 61.0,
                fail_init: bool = False) -> types.ModuleType:
    """A `pynvml` whose SM clock reads ``clocks`` in turn (the last one repeated)."""
    module = types.ModuleType("pynvml")
    module.NVMLError = NVMLError
    module.NVML_CLOCK_SM, module.NVML_TEMPERATURE_GPU = "sm", "gpu"
    module.asked = []
    left = list(clocks)

    def init() -> None:
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def by_uuid(uuid: str):
        raise NVMLError("Not Found")

    def clock(handle, which):
        module.asked.append((handle, which))
        return left.pop(0) if len(left) > 1 else left[0]

    module.nvmlInit = init
    module.nvmlDeviceGetHandleByUUID = by_uuid
    module.nvmlDeviceGetHandleByIndex = lambda index: f"handle{index}"
    module.nvmlDeviceGetClockInfo = clock
    module.nvmlDeviceGetPowerUsage = lambda handle: power_mw
    module.nvmlDeviceGetTemperature = lambda handle, which: temp if which == "gpu" else -1
    return module


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch):
    """Install a fake pynvml (returned by the fixture's call) with a fresh reader cache."""
    def install(module: types.ModuleType | None) -> types.ModuleType | None:
        monkeypatch.setitem(sys.modules, "pynvml", module)
        open_reader.cache_clear()
        return module

    yield install
    open_reader.cache_clear()


# -- reading NVML --

def test_the_reader_reads_the_sm_clock_power_in_watts_and_temperature(nvml) -> None:
    fake = nvml(fake_pynvml([1980.0, 1755.0]))
    read = open_reader(GPU0)
    first, second = read(), read()  # the opening read took 1980
    assert (second.clock_mhz, second.power_w, second.temp_c) == (1755.0, 350.0, 61.0)
    assert first.t <= second.t
    assert fake.asked[-1] == ("handle0", "sm")  # no UUID from torch here: by index
    assert telemetry.describe(GPU0) == {"source": "nvml", "interval_ms": 10.0,
                                        "throttle_fraction": 0.1}


@pytest.mark.parametrize(("module", "reason"), [
    (None, "no NVML (pip install nvidia-ml-py)"),  # not installed: import fails
    (fake_pynvml([1.0], fail_init=True), "NVML failed: NVML Shared Library Not Found"),
])
def test_without_nvml_the_reason_is_kept_and_nothing_samples(nvml, module, reason) -> None:
    nvml(module)
    assert open_reader(GPU0) == reason
    assert telemetry.sampler(GPU0) is None
    assert telemetry.describe(GPU0) == {"unavailable": reason}


def test_no_gpu_no_sampler(nvml) -> None:
    nvml(fake_pynvml([1500.0]))  # even where NVML answers
    assert telemetry.sampler(CPU) is None
    assert telemetry.describe(CPU)["unavailable"].startswith("no CUDA device")


# -- the sampler --

def test_the_sampler_reads_in_the_background_until_it_exits() -> None:
    enough = threading.Event()
    count = iter(range(10**6))

    def read() -> Reading:
        n = next(count)
        if n == 4:
            enough.set()
        return Reading(float(n), 1000.0 + n, 300.0, 50.0)

    with Sampler(read, interval_s=0.001) as sampler:
        assert enough.wait(5), "the thread never read four times"
    got = len(sampler.readings)
    assert got >= 5 and sampler.error is None
    assert [r.t for r in sampler.readings] == list(range(got))  # in order, none lost
    assert not sampler._thread.is_alive()


def test_a_reading_that_fails_ends_sampling_and_keeps_the_rest() -> None:
    calls = iter([Reading(0.0, 1.0, 1.0, 1.0), Reading(1.0, 2.0, 1.0, 1.0)])

    def read() -> Reading:
        try:
            return next(calls)
        except StopIteration:
            raise NVMLError("GPU is lost") from None

    with Sampler(read, interval_s=0.0) as sampler:
        sampler._thread.join(5)
    assert [r.clock_mhz for r in sampler.readings] == [1.0, 2.0]
    assert sampler.error == "NVMLError: GPU is lost"


def test_medians_min_and_max() -> None:
    readings = [Reading(t, clock, power, temp) for t, clock, power, temp in
                [(0, 1800, 500, 60), (1, 1500, 400, 65), (2, 1700, 700, 62), (3, 1900, 450, 61)]]
    got = summarize(readings)
    assert (got.clock_mhz_median, got.clock_mhz_min) == (1750.0, 1500.0)
    assert (got.power_w_median, got.temp_c_max, got.readings) == (475.0, 65.0, 4)
    assert summarize([]) is None
    assert [r.t for r in within(readings, [(0.5, 1.0), (2.5, 9.0)])] == [1, 3]


# -- readings per step of an interleaved timing --

class SampledClock(ScriptedClock):
    """A scripted clock with a time line (each call lasts its scripted ms) and a sampler that
    read the device as step 0 (a) running at 1000 MHz and step 1 (b) at 1500."""

    def __init__(self) -> None:
        super().__init__(lambda step, call: 1.0, fixed_rounds=4, fixed_turn=(1, 2))
        self.now = 0.0
        self.runs: list[tuple[int, float, float]] = []  # (step, start s, end s)
        self.sampler = _Recorded(self)

    def call(self, fn):
        ms = super().call(fn)
        start, self.now = self.now, self.now + ms / 1e3
        self.runs.append((self.order[-1], start, self.now))
        return (start, self.now, ms)

    def read(self, handles):
        return [h[2] for h in handles]

    def span(self, handles):
        return handles[0][0], handles[-1][1]


class _Recorded:
    """A sampler whose readings are made up after the fact from the clock's time line: one in
    the middle of every call, at the clock of the step that ran."""

    def __init__(self, clock: SampledClock) -> None:
        self.clock = clock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def readings(self) -> list[Reading]:
        mhz = {0: 1000.0, 1: 1500.0}
        return [Reading((a + b) / 2, mhz[step], 100.0 * (step + 1), 50.0)
                for step, a, b in self.clock.runs]


def test_each_step_gets_the_readings_of_its_own_timed_calls() -> None:
    got = measure_interleaved({"a": lambda: None, "b": lambda: None}, Timing(), CPU, "a",
                              clock=SampledClock())
    a, b = got.times["a"].telemetry, got.times["b"].telemetry
    assert (a.clock_mhz_median, a.power_w_median) == (1000.0, 100.0)
    assert (b.clock_mhz_median, b.power_w_median) == (1500.0, 200.0)
    # 4 rounds x 2 timed calls each; the settling call of each turn is not the step's timed part
    assert a.readings == b.readings == 8


def test_a_clock_without_a_sampler_records_no_telemetry() -> None:
    got = measure_interleaved({"a": lambda: None}, Timing(), CPU, None,
                              clock=ScriptedClock(lambda s, c: 1.0, fixed_rounds=2))
    assert got.times["a"].telemetry is None


# -- throttled rows --

def test_the_throttle_note_past_ten_percent_below_the_run_median() -> None:
    assert throttle_note(1529.0, 1700.0) == "throttled (clock 1529 MHz, run median 1700 MHz)"
    assert throttle_note(1531.0, 1700.0) is None  # 9.9% below
    assert throttle_note(math.nan, 1700.0) is None and throttle_note(1000.0, None) is None


def test_notes_against_the_median_of_the_rows_of_each_gpu() -> None:
    rows = [{"gpu": "H200", "clock_mhz_median": c} for c in (1800, 1790, 1810, 1500, "nan")]
    rows.append({"gpu": "A100", "clock_mhz_median": 1200})  # slow, but alone on its GPU
    notes = throttle_notes(rows)
    assert notes == [None, None, None, "throttled (clock 1500 MHz, run median 1795 MHz)",
                     None, None]


def test_with_note_replaces_an_earlier_note() -> None:
    note = "throttled (clock 1500 MHz, run median 1800 MHz)"
    assert with_note("", note) == note
    assert with_note("faster than the speed of light", note) == (
        f"faster than the speed of light; {note}")
    assert with_note(with_note("x", "throttled (clock 1 MHz, run median 9 MHz)"), note) == (
        f"x; {note}")
    assert with_note(f"x; {note}", None) == "x"


def telemetry_row(provider: str, clock: float, message: str = "") -> ResultRow:
    return ResultRow(
        run_id="r", timestamp="t", gpu="NVIDIA H200", torch_version="2.11", triton_version="3.6",
        git_sha="0123456", interpreter=False, case_id=f"c-{provider}", provider=provider,
        mode="fwd", dtype="bfloat16", batch=1, seqlen=1024, q_len=1024, heads=8, kv_heads=8,
        head_dim=64, causal=True, pattern="dense(bs64)", pattern_hash="h", block_size=64,
        density=1.0, seed=0, ms=1.0, clock_mhz_median=clock, clock_mhz_min=clock - 50,
        power_w_median=600.0, message=message)


def test_flag_throttled_rewrites_messages_and_keeps_every_row(tmp_path: Path) -> None:
    csv = tmp_path / RESULTS_FILE
    rows = [telemetry_row("a", 1800), telemetry_row("b", 1790, "a note"),
            telemetry_row("c", 1400, "a note"), telemetry_row("d", math.nan)]
    for r in rows:
        append_row(csv, r)
    before = read_results(csv)
    assert flag_throttled(csv) == 1
    after = read_results(csv)
    assert list(after.columns) == list(before.columns) and len(after) == 4
    assert list(after["message"].fillna("")) == [
        "", "a note", "a note; throttled (clock 1400 MHz, run median 1790 MHz)", ""]
    assert after["git_sha"].tolist() == ["0123456"] * 4  # text columns untouched
    # judged again (a resumed run): against the new median (1800, 1790, 1400, 1300: 1595), the
    # note replaced, never doubled
    append_row(csv, telemetry_row("e", 1300))
    assert flag_throttled(csv) == 2
    messages = list(read_results(csv)["message"].fillna(""))
    assert messages[2] == "a note; throttled (clock 1400 MHz, run median 1595 MHz)"
    assert messages[4] == "throttled (clock 1300 MHz, run median 1595 MHz)"
    assert not list(tmp_path.glob("*.rewrite"))


def test_a_file_without_clocks_is_left_untouched(tmp_path: Path) -> None:
    csv = tmp_path / RESULTS_FILE
    append_row(csv, telemetry_row("a", math.nan))
    stamp = csv.stat().st_mtime_ns
    assert flag_throttled(csv) == 0 and csv.stat().st_mtime_ns == stamp
    assert flag_throttled(tmp_path / "missing.csv") == 0


def test_a_torn_file_is_left_for_its_reader_to_heal(tmp_path: Path) -> None:
    csv = tmp_path / RESULTS_FILE
    append_row(csv, telemetry_row("a", 1800))
    append_row(csv, telemetry_row("b", 1000))
    data = csv.read_bytes() + b"run,cut-off"
    csv.write_bytes(data)
    assert flag_throttled(csv) == 0 and csv.read_bytes() == data


# -- a run --

def test_a_cpu_run_says_why_there_is_no_telemetry(tmp_path: Path) -> None:
    path = write_spec(tmp_path)
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    (row,) = runner.execute(sweep, path.read_text(), plan, CPU)
    assert read_meta(plan.run_dir)["telemetry"]["unavailable"].startswith("no CUDA device")
    assert all(math.isnan(getattr(row, c)) for c in
               ("clock_mhz_median", "clock_mhz_min", "power_w_median", "temp_c_max"))
    assert row.row_bytes > 0  # the bytes are the work's, known without a GPU


def test_a_run_ends_by_flagging_throttled_rows(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    clocks = iter([1800.0, 1300.0])

    def timed(fn, timing, device):
        got = real(fn, timing, device)
        clock = next(clocks)
        return replace(got, telemetry=telemetry.Telemetry(clock, clock, 500.0, 60.0, 5))

    real = runner.measure
    monkeypatch.setattr(runner, "measure", timed)
    path = write_spec(tmp_path, seqlen=[64, 128], timing={"warmup_ms": 1, "rep_ms": 1,
                                                          "interleave": False})
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    runner.execute(sweep, path.read_text(), plan, CPU)
    df = read_results(plan.run_dir)
    assert list(df["clock_mhz_median"]) == [1800.0, 1300.0]
    assert df["message"].fillna("").tolist()[1] == (
        "throttled (clock 1300 MHz, run median 1550 MHz)")
