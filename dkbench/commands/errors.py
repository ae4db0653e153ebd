"""The one place where harness errors become a message on stderr and an exit code."""

from __future__ import annotations

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


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn a `DkbenchError` raised inside the block into its message and exit code."""
    try:
        yield
    except DkbenchError as exc:
        raise fail(exc) from None
