"""The one place where harness errors become a message on stderr and an exit code."""

from __future__ import annotations

import errno
import functools
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import BadInputError, DkbenchError

err_console = Console(stderr=True)


def fail(exc: DkbenchError) -> typer.Exit:
    """Print ``exc`` on stderr and return the `typer.Exit` (with its exit code) to raise."""
    err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False,
                      soft_wrap=True)
    return typer.Exit(code=exc.exit_code)


def path_flag(flag: str, allowed: str) -> Callable[[str], Path]:
    """A parser of a path flag or argument refusing an empty value (an unset variable in
    `--out "$DIR"`): Path("") is ".", which would name the current directory in silence."""
    def parse(text: str) -> Path:
        if not text:
            raise fail(BadInputError(f"{flag} '': names no path; allowed: {allowed}"))
        return Path(text)
    return parse


def plain_warnings() -> None:
    """Show the warnings the library raises on purpose (a torn results row set aside, a config
    cache file ignored, a calibration file replaced) as one ``warning:`` line on stderr, not
    Python's file:line form."""
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


def plain_path_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with a path the OS refuses for its length (ENAMETOOLONG, from any of its path
    flags or arguments) reported as bad input: pathlib's exists() and is_file() raise it where
    they answer False for a path that is merely absent."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            raise fail(BadInputError(f"{exc.filename}: {exc.strerror}; allowed: file names of "
                                     "at most 255 bytes, paths of at most 4096")) from None
    return wrapper
