"""The console script's entry: the Typer app, imported inside a guard because importing torch
and the kernels takes seconds, and a Ctrl-C then must end in one line, not a traceback."""

from __future__ import annotations

import signal
import sys

from .errors import INTERRUPTED


def stop_on_sigterm_as_on_ctrl_c() -> None:
    """SIGTERM (`kill`, a job scheduler's stop) ends a command as Ctrl-C does: the rows written
    so far kept, the way to finish them printed, exit 130. Left alone where someone set it."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def main() -> None:
    from . import startup

    startup.mark()  # the summaries count the seconds from here to the work as start-up
    stop_on_sigterm_as_on_ctrl_c()
    try:
        from .cli import app
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None
    app()
