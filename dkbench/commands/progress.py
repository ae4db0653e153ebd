"""The progress bar every long command shows: current item, done/total, elapsed time and ETA."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

OnProgress = Callable[[str, int, int], None]


@contextmanager
def progress_bar(console: Console) -> Iterator[OnProgress]:
    """Yield ``on_progress(text, done, total)`` that drives one rich progress bar."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=None)

        def on_progress(text: str, done: int, total: int) -> None:
            progress.update(task, description=text[:90], completed=done, total=total)

        yield on_progress
