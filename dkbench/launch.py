"""The console script's entry: the Typer app, imported inside a guard because importing torch
and the kernels takes seconds, and a Ctrl-C then must end in one line, not a traceback."""

from __future__ import annotations

import sys

from .errors import INTERRUPTED


def main() -> None:
    from . import startup

    startup.mark()  # the summaries count the seconds from here to the work as start-up
    try:
        from .cli import app
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None
    app()
