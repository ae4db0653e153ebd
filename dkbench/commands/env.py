"""`dkbench env`: this machine's GPU, versions, which providers can run here, and the GPU's
calibrated speed of light."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import BadInputError, DkbenchError
from ..spec.sweep import DEVICES
from .errors import fail

console = Console()


class CalibrationFailed(DkbenchError):
    """The GPU could not be measured (out of memory, a CUDA error), or the measurement not kept."""

    exit_code = 1


def check_calibration_target(path: Path) -> None:
    """BadInputError when ``--calibrate`` could not keep what it measures at ``path``: said before
    the ten seconds of measuring, not after."""
    from kernels import ENV_VAR, default_cache_path

    from ..measure import calibrate

    cache = default_cache_path()
    if os.environ.get(ENV_VAR) and cache.is_dir():
        # calibration.json goes beside the config cache file, so here beside this directory.
        raise BadInputError(f"{ENV_VAR}={cache} is a directory; allowed: the config cache's file "
                            f"path, e.g. {cache / 'configs.json'}")
    try:
        calibrate.check_writable(path)
    except OSError as exc:
        raise BadInputError(f"--calibrate: {exc}; set {ENV_VAR} to a file in a writable "
                            "directory") from None


def check_device_flag(device: str) -> None:
    if device not in DEVICES:
        raise BadInputError(f"--device {device!r}: allowed values are {', '.join(DEVICES)}")


def _interpreter_off(provider: str, device: torch.device) -> str | None:
    """Why a Triton provider cannot run on the CPU with Triton's interpreter turned off (a
    TRITON_INTERPRET other than 1, which the CLI leaves as the user set it), or None."""
    from ..measure.envinfo import TRITON_PROVIDERS, interpreting

    if provider not in TRITON_PROVIDERS or device.type != "cpu" or interpreting():
        return None
    return (f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} turns Triton's "
            "interpreter off, which its kernels need on the CPU; unset it or set "
            "TRITON_INTERPRET=1")


def env(
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    measure: Annotated[bool, typer.Option(
        "--calibrate", help="Measure this GPU's matrix rate and copy bandwidth (about 10 s) and "
                            "store it beside the best-config cache.")] = False,
) -> None:
    """GPU, versions, and which providers can run here (and why not)."""
    from ..measure import calibrate
    from ..measure.envinfo import environment
    from ..measure.providers import PROVIDERS
    from ..measure.runner import resolve_device

    try:
        check_device_flag(device)
        dev = resolve_device(device)
    except DkbenchError as exc:
        raise fail(exc) from None
    info = environment(dev)
    table = Table(title="environment", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)
    providers = Table(title="providers")
    providers.add_column("provider")
    providers.add_column("computes")
    providers.add_column("available here")
    for name, cls in PROVIDERS.items():
        reason = cls().unavailable(dev) or _interpreter_off(name, dev)
        providers.add_row(name, cls.computes, "yes" if reason is None else escape(f"no: {reason}"))
    console.print(providers)

    reason = calibrate.unavailable_reason(dev)
    if reason is not None:
        if measure:  # asked for, and not done: not a success
            raise fail(BadInputError(f"--calibrate: {reason}; it measures a CUDA GPU"))
        console.print(f"calibration: {escape(reason)}", highlight=False)
        return
    path = calibrate.calibration_path()
    saved = True
    if measure:
        try:
            check_calibration_target(path)
        except DkbenchError as exc:
            raise fail(exc) from None
        console.print("Calibrating (about 10 s)...")
        try:
            cal = calibrate.load_or_calibrate(dev, path, force=True)
        except (RuntimeError, OSError) as exc:  # torch's CUDA errors (OOM included) are these
            first = (str(exc).strip().splitlines() or [""])[0]
            raise fail(CalibrationFailed(f"--calibrate: calibrating failed: "
                                         f"{type(exc).__name__}: {first}")) from None
        # load_or_calibrate warns and goes on when the write fails (a full disk): do not show the
        # file as holding what it does not.
        saved = calibrate.stored(dev, path) == cal
    else:
        cal = calibrate.stored(dev, path)
        if cal is None:
            console.print(f"calibration: none stored for this GPU in {escape(str(path))}; "
                          "make one with `dkbench env --calibrate`", highlight=False)
            return
    measured = Table(title="calibration", show_header=False)
    file_row = str(path) if saved else f"{path} (NOT saved: see the warning above)"
    for label, value in calibrate.summary_rows(cal) + [("file", file_row)]:
        measured.add_row(label, escape(value))
    console.print(measured)
    if not saved:
        raise fail(CalibrationFailed(f"--calibrate: measured, but could not write {path}"))
