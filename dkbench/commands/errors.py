"""The one place where harness errors become a message on stderr and an exit code."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import DkbenchError

err_console = Console(stderr=True)


def fail(exc: DkbenchError) -> typer.Exit:
    """Print ``exc`` on stderr and return the `typer.Exit` (with its exit code) to raise."""
    err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False,
                      soft_wrap=True)
    return typer.Exit(code=exc.exit_code)


def plain_warnings() -> None:
    """Show the warnings the library raises on purpose (a torn results row set aside, a config
    cache or calibration file set aside) as one ``warning:`` line on stderr, not Python's
    file:line form."""
    from kernels import ConfigCacheWarning

    from ..errors import TornRowWarning
    from ..measure.calibrate import CalibrationWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (TornRowWarning, ConfigCacheWarning, CalibrationWarning)):
            err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}",
                              highlight=False, soft_wrap=True)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn a `DkbenchError` raised inside the block into its message and exit code."""
    try:
        yield
    except DkbenchError as exc:
        raise fail(exc) from None
