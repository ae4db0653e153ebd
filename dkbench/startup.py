"""When the command started, so that its summaries can count the start-up (Python, torch, the
kernels and the spec read, before any work) in its wall time. Set by the console script's entry
(`dkbench.launch.main`) only: a command invoked in-process (tests, notebooks) has no start-up of
its own to count."""

from __future__ import annotations

import time

_started: float | None = None  # time.perf_counter() at the entry
# How the summaries name those seconds: Python, torch and the kernels imported, the spec read and
# the work planned (several seconds on a machine without byte-code caches).
STARTUP = "start-up (imports, spec, plan)"


def mark() -> None:
    """Record now as the command's start (the entry calls this before importing the app)."""
    global _started
    _started = time.perf_counter()


def seconds() -> float | None:
    """Seconds since the command started, or None where no start was recorded."""
    return None if _started is None else time.perf_counter() - _started
