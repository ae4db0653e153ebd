"""What the GPU did while a row was timed: its SM clock, power and temperature, read through NVML.

A `Sampler` reads the device every `INTERVAL_S` in a background thread while a provider is timed
(`dkbench.measure.timing`); a row keeps the median and the lowest clock, the median power and the
highest temperature of the readings taken while its own calls ran. A power-capped or hot GPU
lowers its clock, and a row timed at a lower clock than the rest of its run is slow for that
reason, not for its kernel: once the run is over, `flag_throttled` marks every row whose median
clock fell more than `THROTTLE_FRACTION` below the run's median, and the gate skips such rows.

Readings need the `nvidia-ml-py` package (module `pynvml`) and a CUDA device; without either the
columns stay empty and `describe` says why, for meta.json.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..results.schema import ResultRow, rewrite_results

INTERVAL_S = 0.01
# A GPU's clock steps by a few percent with power draw (on an H100, cuDNN's attention alone ran at
# 1.50-1.58 GHz and SDPA's flash backend alone at 1.71-1.73 GHz); a tenth below the run's median
# is past that spread.
THROTTLE_FRACTION = 0.10
_NO_NVML = "no NVML (pip install nvidia-ml-py)"
_NOTE = re.compile(r"(?:; )?throttled \(clock [^)]*\)")


@dataclass(frozen=True)
class Reading:
    """One NVML reading; ``t`` is `time.perf_counter` seconds, the timers' time line."""

    t: float
    clock_mhz: float
    power_w: float
    temp_c: float


@dataclass(frozen=True)
class Telemetry:
    """What a row records of its readings."""

    clock_mhz_median: float
    clock_mhz_min: float
    power_w_median: float
    temp_c_max: float
    readings: int


def summarize(readings: Sequence[Reading]) -> Telemetry | None:
    """The row's numbers from its readings; None when there are none."""
    if not readings:
        return None
    clocks = [r.clock_mhz for r in readings]
    return Telemetry(statistics.median(clocks), min(clocks),
                     statistics.median(r.power_w for r in readings),
                     max(r.temp_c for r in readings), len(readings))


def within(readings: Iterable[Reading], spans: Sequence[tuple[float, float]]) -> list[Reading]:
    """The readings taken inside any of ``spans`` ((start, end) in perf_counter seconds)."""
    return [r for r in readings if any(start <= r.t <= end for start, end in spans)]


def record(row: ResultRow, telemetry: Telemetry | None) -> None:
    """Fill a row's telemetry columns (left NaN when nothing was read)."""
    if telemetry is not None:
        row.clock_mhz_median, row.clock_mhz_min = telemetry.clock_mhz_median, telemetry.clock_mhz_min
        row.power_w_median, row.temp_c_max = telemetry.power_w_median, telemetry.temp_c_max


# -- sampling --

class Sampler:
    """Calls ``read`` every ``interval_s`` in a background thread between enter and exit.

    A reading that raises (the driver went away) ends the sampling; what was read stays, and
    ``error`` says why it stopped. Single use: enter it once.
    """

    def __init__(self, read: Callable[[], Reading], interval_s: float = INTERVAL_S) -> None:
        self.readings: list[Reading] = []
        self.error: str | None = None
        self._read, self._interval = read, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dkbench-telemetry", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                self.readings.append(self._read())
            except Exception as exc:  # noqa: BLE001 - telemetry never fails a measurement
                self.error = f"{type(exc).__name__}: {exc}"
                return
            if self._stop.wait(self._interval):
                return


def nvml_reader(pynvml, handle) -> Callable[[], Reading]:
    """A function reading the SM clock (MHz), power (NVML gives mW) and temperature (C) of one
    NVML device handle."""
    def read() -> Reading:
        t = time.perf_counter()
        return Reading(t, float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                       pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                       float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)))
    return read


def _handle(pynvml, device: torch.device):
    try:
        # By UUID, since CUDA_VISIBLE_DEVICES renumbers CUDA devices but not NVML's.
        return pynvml.nvmlDeviceGetHandleByUUID(
            f"GPU-{uuid.UUID(str(torch.cuda.get_device_properties(device).uuid))}")
    except Exception:  # noqa: BLE001 - no UUID from torch or NVML: fall back on the index
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


@functools.cache
def open_reader(device: torch.device) -> Callable[[], Reading] | str:
    """The reader for ``device``, or why there is none. NVML is opened once per process and
    device (and never shut: other readers may share it)."""
    if device.type != "cuda":
        return "no CUDA device (interpreter timings: no GPU to sample)"
    try:
        import pynvml
    except ImportError:
        return _NO_NVML
    try:
        pynvml.nvmlInit()
        read = nvml_reader(pynvml, _handle(pynvml, device))
        read()  # a device that answers nothing fails here, not in every measurement
    except pynvml.NVMLError as exc:
        return f"NVML failed: {exc}"
    return read


def sampler(device: torch.device) -> Sampler | None:
    """A fresh sampler of ``device``, or None where it cannot be read."""
    read = open_reader(device)
    return None if isinstance(read, str) else Sampler(read)


def describe(device: torch.device) -> dict:
    """What meta.json records: how rows were sampled, or ``{"unavailable": reason}``."""
    read = open_reader(device)
    if isinstance(read, str):
        return {"unavailable": read}
    return {"source": "nvml", "interval_ms": INTERVAL_S * 1e3,
            "throttle_fraction": THROTTLE_FRACTION}


# -- throttled rows --

def _float(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def throttle_note(clock_mhz: float, run_median_mhz: float | None) -> str | None:
    """``throttled (clock X MHz, run median Y MHz)`` when ``clock_mhz`` is more than
    THROTTLE_FRACTION below the run's median; else None (also when either is unknown)."""
    if run_median_mhz is None or not math.isfinite(clock_mhz):
        return None
    if clock_mhz >= (1 - THROTTLE_FRACTION) * run_median_mhz:
        return None
    return f"throttled (clock {clock_mhz:.0f} MHz, run median {run_median_mhz:.0f} MHz)"


def throttle_notes(rows: Sequence[Mapping[str, object]]) -> list[str | None]:
    """Each row's throttle note against the median clock of the rows of the same GPU (by name:
    a merged run may hold several). Rows without a clock (failed, old files) get None."""
    clocks = [_float(r.get("clock_mhz_median")) for r in rows]
    by_gpu: dict[str, list[float]] = {}
    for row, clock in zip(rows, clocks):
        if math.isfinite(clock):
            by_gpu.setdefault(str(row.get("gpu", "")), []).append(clock)
    medians = {gpu: statistics.median(values) for gpu, values in by_gpu.items()}
    return [throttle_note(clock, medians.get(str(row.get("gpu", ""))))
            for row, clock in zip(rows, clocks)]


def with_note(message: str, note: str | None) -> str:
    """``message`` with any earlier throttle note replaced by ``note`` (or removed)."""
    base = _NOTE.sub("", message or "")
    if note is None:
        return base
    return f"{base}; {note}" if base else note


def flag_throttled(results: Path) -> int:
    """Put each row's throttle note in its message, against the run as it now stands (a resumed
    run judges its old rows again); returns how many rows are throttled. The file is replaced
    whole (`rewrite_results`), so a crash leaves either version, never a mix or a lost row."""
    count = 0

    def update(rows: list[dict[str, str]]) -> bool:
        nonlocal count
        changed = False
        for row, note in zip(rows, throttle_notes(rows)):
            count += note is not None
            message = with_note(row.get("message", ""), note)
            changed |= message != row.get("message", "")
            row["message"] = message
        return changed

    rewrite_results(results, update)
    return count
