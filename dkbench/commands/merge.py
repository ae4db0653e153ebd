"""`dkbench merge`: combine shard run directories (`dkbench run --shard I/N`) into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import BadInputError, DkbenchError
from ..results.schema import RESULTS_FILE
from .errors import fail, path_flag


def merge(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR", parser=path_flag("RUN_DIR", "a run directory ('.' for this one)"),
        help="Run directories to combine (e.g. one per shard), in order: with --force the last "
             "one's row wins a duplicate.", show_default=False)],
    out: Annotated[Path, typer.Option(
        parser=path_flag("--out", "a new directory for the merged run"),
        help="New run directory that receives the merged run.", show_default=False)],
    force: Annotated[bool, typer.Option(
        "--force", help="Merge runs of different specs or environments, keep the last of "
                        "duplicate rows, and overwrite --out.")] = False,
) -> None:
    """Combine run directories of one spec into one; exit 0 ok, 2 bad input."""
    from ..results.merge import merge_runs

    console, err_console = Console(), Console(stderr=True)
    try:
        _check_out_apart(run_dirs, out)
        result = merge_runs(run_dirs, out, force=force)
    except DkbenchError as exc:
        raise fail(exc) from None
    for note in result.notes:
        err_console.print(f"[yellow]warning:[/yellow] {escape(note)}", highlight=False)
    shards = f" (shards {', '.join(result.shards)})" if result.shards else ""
    console.print(f"Merged {result.rows} rows from {result.sources} run directories{shards} into "
                  f"[bold]{escape(str(out))}[/bold]", highlight=False)


def _check_out_apart(run_dirs: list[Path], out: Path) -> None:
    """Refuse an --out inside a RUN_DIR, or a folder that holds one (at any depth): the merged run
    would sit in a shard's run directory (deleted with it, listed as its sub-run), or turn the
    folder of runs around a shard into a run as well, which gate, plot and --resume then read as
    that run."""
    target = out.resolve()
    # Only real runs: a RUN_DIR that is none is refused by merge_runs, with the reason.
    for run_dir in (d for d in run_dirs if (d / RESULTS_FILE).is_file()):
        source = run_dir.resolve()
        if source in target.parents:
            raise BadInputError(f"--out {out}: is inside the RUN_DIR {run_dir}; give a new "
                                "directory outside every RUN_DIR")
        if target in source.parents:
            raise BadInputError(f"--out {out}: holds the RUN_DIR {run_dir}; give a new "
                                "directory outside every RUN_DIR")
