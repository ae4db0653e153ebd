"""`dkbench merge`: combine shard run directories (`dkbench run --shard I/N`) into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import DkbenchError
from .errors import fail


def merge(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR",
        help="Run directories to combine (e.g. one per shard), in order: with --force the last "
             "one's row wins a duplicate.", show_default=False)],
    out: Annotated[Path, typer.Option(help="New run directory that receives the merged run.",
                                      show_default=False)],
    force: Annotated[bool, typer.Option(
        "--force", help="Merge runs of different specs or environments, keep the last of "
                        "duplicate rows, and overwrite --out.")] = False,
) -> None:
    """Combine run directories of one spec into one; exit 0 ok, 2 bad input."""
    from ..results.merge import merge_runs

    console, err_console = Console(), Console(stderr=True)
    try:
        result = merge_runs(run_dirs, out, force=force)
    except DkbenchError as exc:
        raise fail(exc) from None
    for note in result.notes:
        err_console.print(f"[yellow]warning:[/yellow] {escape(note)}", highlight=False)
    shards = f" (shards {', '.join(result.shards)})" if result.shards else ""
    console.print(f"Merged {result.rows} rows from {result.sources} run directories{shards} into "
                  f"[bold]{escape(str(out))}[/bold]", highlight=False)
