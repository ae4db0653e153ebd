"""What machine and software a run happened on (every row and meta.json carry it)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import triton

from ..names import BUNDLED_PROVIDER

# Providers whose kernels are Triton's: on a CPU they run only through its interpreter.
TRITON_PROVIDERS = (BUNDLED_PROVIDER,)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def git_sha(root: Path | None = None) -> str:
    """Short sha of the checkout's HEAD, with ``-dirty`` when the tree has uncommitted changes
    (the measured code is then not exactly that commit); empty outside a git checkout."""
    root = root or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=root,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "",
        "interpreter": interpreting(),
        "git_sha": git_sha(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30, 1),
                    driver=_driver_version())
    else:
        info.update(gpu="cpu (triton interpreter)" if interpreting() else "cpu", capability="",
                    driver="")
    return info


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
