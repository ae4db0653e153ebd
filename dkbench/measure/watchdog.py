"""A deadline on one case x provider's preparation in the run's own process.

A kernel that never ends cannot be taken back: the call waits on the GPU for good, and so would
the run. The compile-ahead phase, the `--gpus` workers and the tune's compile workers prepare in
processes they can stop; a preparation in the command's own process (`run --no-compile-ahead`,
every case after the phase, the tune's timing phase) has no one to stop it but itself. So a timer
thread watches it: a preparation still going after `PREPARE_LIMIT_S` has its error row handed to
the command (`runner.stop_stuck` writes it and says where the run stopped, `--resume` going on
after it; `tuner.stop_stuck_tune` records the candidate), and the process ends with exit status
`STUCK_EXIT`, what was written so far kept.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

# As long as a `--gpus` worker may stay silent on one case (dkbench.measure.parallel): a first
# compile of a peer's kernels takes minutes at most; an hour is a call that never returns.
PREPARE_LIMIT_S = 3600.0
STUCK_EXIT = 1


def limit_for(device: object) -> float | None:
    """The deadline of a preparation on ``device`` (a torch.device): `PREPARE_LIMIT_S` on a GPU,
    None elsewhere (the interpreter's calls always end, however slow)."""
    return PREPARE_LIMIT_S if getattr(device, "type", None) == "cuda" else None


@contextmanager
def deadline(limit_s: float | None, on_stuck: Callable[[], None]) -> Iterator[None]:
    """Run the body with ``on_stuck`` called from another thread once ``limit_s`` passes while
    the body still runs (never after it ended; ``limit_s`` None: no deadline). ``on_stuck`` is
    expected to end the process: the body cannot be interrupted."""
    if limit_s is None:
        yield
        return
    lock = threading.Lock()
    ended = False

    def fire() -> None:
        with lock:  # the body's end and the deadline never both act
            if not ended:
                on_stuck()

    timer = threading.Timer(limit_s, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:  # blocks for good if on_stuck is ending the process now
            ended = True


def stop_process(message: str) -> None:
    """Print ``message`` to stderr and end the process at once with `STUCK_EXIT` (no clean-up:
    the main thread is stuck in a call that never returns)."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(STUCK_EXIT)
