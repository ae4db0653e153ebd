"""What this GPU actually does: measured matrix rate per dtype and copy bandwidth, kept on disk.

Datasheet peaks overstate what a part sustains (power and clock limits, a cut-down SKU), so a
speed of light is only honest against a rate measured on this very GPU. One file beside the
best-config cache, ``calibration.json``, holds one entry per (gpu, capability, torch, triton)::

    {"format": 1, "entries": {"<gpu>|<capability>|<torch>|<triton>": {...Calibration.as_dict()...}}}

A file that cannot be read is warned about (``CalibrationWarning``) and replaced by the next
measurement; a file that cannot be written is warned about and the measurement used anyway.
Unreadable includes an entry filed under a key that is not its own (another GPU's numbers) and a
rate that is not a positive finite number. A directory in the file's place is warned about and
never read or replaced.
"""

from __future__ import annotations

import json
import math
import os
import stat
import statistics
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

__all__ = ["Calibration", "CalibrationWarning", "calibrate", "calibration_path", "check_writable",
           "copy_gbs", "load_or_calibrate", "stored", "summary_rows", "tflops",
           "unavailable_reason"]

FORMAT_VERSION = 1
MATMUL_N = 8192
COPY_BYTES = 2 * 2**30
_SAMPLES = 7
_NO_CUDA = "no CUDA device (interpreter timings have no speed of light)"


class CalibrationWarning(UserWarning):
    """The calibration file could not be read (it will be replaced) or written; ``path`` is it."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Calibration:
    gpu: str
    capability: str
    torch: str
    triton: str
    matmul_tflops: dict[str, float] = field(hash=False)
    copy_gbs: float
    sm_clock_mhz: float | None
    measured_at: str

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Raises KeyError, TypeError or ValueError on an entry of the wrong shape, including a
        rate that is not a positive finite number (a zero bandwidth would divide by zero in the
        speed of light; a NaN or negative one would make every sol_pct a lie)."""
        clock = d["sm_clock_mhz"]
        rates = d["matmul_tflops"]
        if not isinstance(rates, dict):
            raise TypeError(f"matmul_tflops is {_short(rates)}; allowed: an object of "
                            "dtype -> TFLOP/s")
        return cls(gpu=str(d["gpu"]), capability=str(d["capability"]), torch=str(d["torch"]),
                   triton=str(d["triton"]),
                   matmul_tflops={str(k): _rate(f"matmul_tflops.{k}", v)
                                  for k, v in rates.items()},
                   copy_gbs=_rate("copy_gbs", d["copy_gbs"]),
                   sm_clock_mhz=None if clock is None else _rate("sm_clock_mhz", clock),
                   measured_at=str(d["measured_at"]))

    @property
    def key(self) -> str:
        return _key(self.gpu, self.capability, self.torch, self.triton)


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (bool, int, float, list, dict)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _rate(name: str, value: object) -> float:
    """``value`` as a positive finite float; ValueError naming ``name`` otherwise."""
    # bool is an int to Python, but true is no measurement.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} is {_short(value)}; allowed: a positive finite number")
    return float(value)


# -- arithmetic ------------------------------------------------------------------------------


def tflops(m: int, n: int, k: int, ms: float) -> float:
    """TFLOP/s (1e12) of one (m, k) @ (k, n) product that took ``ms`` milliseconds."""
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def copy_gbs(nbytes: int, ms: float) -> float:
    """GB/s (1e9) of copying an ``nbytes`` tensor in ``ms``: every byte is read once and written
    once, so 2 * nbytes move."""
    return 2.0 * nbytes / (ms * 1e-3) / 1e9


def summary_rows(cal: Calibration) -> list[tuple[str, str]]:
    """(label, value) pairs for a table of ``cal``."""
    rows = [(f"matmul {dtype} TFLOP/s", f"{rate:.1f}") for dtype, rate in cal.matmul_tflops.items()]
    # None is also NVML installed but unable to read the clock (permissions, a MIG slice).
    clock = ("n/a (NVML could not read it; pip install nvidia-ml-py if it is missing)"
             if cal.sm_clock_mhz is None
             else f"{cal.sm_clock_mhz:.0f}")
    return rows + [("copy GB/s", f"{cal.copy_gbs:.0f}"), ("SM clock MHz", clock),
                   ("gpu", f"{cal.gpu} (sm {cal.capability})"), ("measured at", cal.measured_at)]


# -- measuring -------------------------------------------------------------------------------


def unavailable_reason(device: torch.device) -> str | None:
    return None if device.type == "cuda" else _NO_CUDA


def _median_ms(fn: Callable[[], object], budget_s: float) -> float:
    """Median over ``_SAMPLES`` CUDA-event timings of ``fn``, warmed up first, with enough calls
    per sample that the samples fill about ``budget_s``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    once_ms = max(start.elapsed_time(end), 1e-3)
    # A quarter of the budget warms clocks up; the rest is timed.
    for _ in range(max(1, int(0.25 * budget_s * 1e3 / once_ms))):
        fn()
    reps = max(1, min(1000, int(0.75 * budget_s * 1e3 / _SAMPLES / once_ms)))
    times = []
    for _ in range(_SAMPLES):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def _matmul_size(device: torch.device) -> int:
    """8192, halved until three bf16 operands (and fp8 copies) fit in a quarter of free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    n = MATMUL_N
    while n > 1024 and 4 * n * n * 2 > free / 4:
        n //= 2
    return n


def _matmuls(device: torch.device, n: int, budget_s: float) -> dict[str, float]:
    rates = {}
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        rates[str(dtype).removeprefix("torch.")] = tflops(n, n, n, _median_ms(lambda: a @ b,
                                                                               budget_s))
    try:
        fp8 = torch.float8_e4m3fn
        a = torch.randn(n, n, device=device).to(fp8)
        b = torch.randn(n, n, device=device).to(fp8).t()  # _scaled_mm wants b column-major
        one = torch.ones((), device=device)

        def scaled() -> torch.Tensor:
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

        rates["float8_e4m3fn"] = tflops(n, n, n, _median_ms(scaled, budget_s))
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        pass  # no fp8 matmul on this GPU or torch: the entry is left out
    return rates


def _copy(device: torch.device, budget_s: float) -> float:
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = COPY_BYTES
    while nbytes > 64 * 2**20 and 2 * nbytes > free / 2:
        nbytes //= 2
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return copy_gbs(nbytes, _median_ms(lambda: dst.copy_(src), budget_s))


def _sm_clock_mhz(device: torch.device) -> float | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            # By UUID, since CUDA_VISIBLE_DEVICES renumbers CUDA devices but not NVML's.
            handle = pynvml.nvmlDeviceGetHandleByUUID(
                f"GPU-{uuid.UUID(str(torch.cuda.get_device_properties(device).uuid))}")
        except (AttributeError, ValueError, pynvml.NVMLError):
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    except pynvml.NVMLError:
        return None


def _identity(device: torch.device) -> tuple[str, str, str, str]:
    major, minor = torch.cuda.get_device_capability(device)
    return (torch.cuda.get_device_name(device), f"{major}.{minor}", torch.__version__,
            triton.__version__)


def _key(gpu: str, capability: str, torch_version: str, triton_version: str) -> str:
    return "|".join((gpu, capability, torch_version, triton_version))


def calibrate(device: torch.device, seconds: float = 10.0) -> Calibration:
    """Measure ``device`` (a CUDA device) in about ``seconds``: n^3 products (n = 8192, smaller
    when memory is short) on random data in bf16, fp16 and, where torch._scaled_mm runs, fp8
    e4m3 with per-tensor scales; then a ~2 GiB device-to-device copy."""
    gpu, capability, torch_version, triton_version = _identity(device)
    with torch.cuda.device(device):
        n = _matmul_size(device)
        rates = _matmuls(device, n, seconds / 4)
        clock = _sm_clock_mhz(device)
        copy = _copy(device, seconds / 4)
        torch.cuda.empty_cache()
    return Calibration(gpu=gpu, capability=capability, torch=torch_version, triton=triton_version,
                       matmul_tflops=rates, copy_gbs=copy, sm_clock_mhz=clock,
                       measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


# -- the file --------------------------------------------------------------------------------


def calibration_path() -> Path:
    """``calibration.json`` in the directory of the best-config cache (``$DKBENCH_CACHE``'s)."""
    from kernels import default_cache_path

    return default_cache_path().parent / "calibration.json"


def _read(path: Path) -> dict[str, dict]:
    """The file's entries; {} when it is missing, and {} with a warning when it is unusable."""
    if path.is_dir():
        # No write can replace a directory (os.replace refuses): do not promise one.
        warnings.warn(CalibrationWarning(
            f"calibration file {path} is a directory; it is ignored (allowed: a calibration "
            "file or nothing there)", path), stacklevel=3)
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        # `is int`: true == 1 in Python, and 1.0 is no format number a writer here makes.
        if not isinstance(data, dict) or type(data.get("format")) is not int or \
                data["format"] != FORMAT_VERSION:
            raise ValueError(f"not a format-{FORMAT_VERSION} calibration file")
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError(f"entries is {_short(entries)}; allowed: an object")
        for key, entry in entries.items():
            # Entries are looked up by key: one filed under another GPU's (or torch's) key would
            # pass that GPU's numbers off as this one's.
            own = Calibration.from_dict(entry).key
            if own != key:
                raise ValueError(f"the entry under {key!r} was measured on {own!r}")
        return dict(entries)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(CalibrationWarning(
            f"calibration file {path} is unreadable ({exc}); it will be replaced by a fresh "
            f"measurement", path), stacklevel=3)
        return {}


def check_writable(path: Path) -> None:
    """Raise OSError naming ``path`` when a write there would fail, for a caller that should fail
    before ten seconds of measuring rather than after."""
    try:
        st = os.stat(path)  # through a symlink, as a write goes
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise OSError(f"cannot write the calibration file {path}: it is {kind}; allowed: a "
                      "regular file or nothing there")
    probe = _target(path).parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise OSError(f"cannot write the calibration file {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OSError(f"cannot write the calibration file {path}: {probe} is not writable")


def _target(path: Path) -> Path:
    # Through a symlink to the file it names: replacing the link would cut it loose.
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def _write(path: Path, entries: dict[str, dict]) -> None:
    """Write atomically: a temp file beside ``path``, then os.replace; raises OSError."""
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if os.name == "posix":  # makes the rename itself survive a power cut
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def stored(device: torch.device, path: Path | None = None) -> Calibration | None:
    """The calibration on file for this GPU and these torch/triton versions; never measures."""
    if unavailable_reason(device):
        return None
    entry = _read(path or calibration_path()).get(_key(*_identity(device)))
    return None if entry is None else Calibration.from_dict(entry)


def load_or_calibrate(device: torch.device, path: Path | None = None,
                      force: bool = False) -> Calibration | None:
    """The stored calibration of this GPU, or (when none matches, or ``force``) a fresh one,
    written to the file. None on a non-CUDA device."""
    if unavailable_reason(device):
        return None
    path = path or calibration_path()
    entries = _read(path)
    entry = entries.get(_key(*_identity(device)))
    if entry is not None and not force:
        return Calibration.from_dict(entry)
    cal = calibrate(device)
    # Re-read after the ten seconds of measuring: another process (another GPU's run) may have
    # written its entry meanwhile, and writing the earlier read back would drop it.
    entries = _read(path)
    entries[cal.key] = cal.as_dict()
    try:
        _write(path, entries)
    except OSError as exc:
        warnings.warn(CalibrationWarning(
            f"could not write calibration file {path} ({exc}); using this measurement unsaved",
            path), stacklevel=2)
    return cal
