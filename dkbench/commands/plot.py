"""`dkbench plot` and `dkbench report`: figures and a Markdown page from run directories."""

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..errors import DkbenchError
from .errors import fail, path_flag

_PATH_HELP = ("A run directory (results.csv + meta.json, maybe tune.csv), a tune directory "
              "(tune.csv + meta.json, from `dkbench tune`), or a directory of them to compare.")
_PATH_ALLOWED = "a run directory, a tune directory or a directory of them ('.' for this one)"


def plot(
    path: Annotated[Path, typer.Argument(parser=path_flag("PATH", _PATH_ALLOWED), help=_PATH_HELP,
                                         show_default=False)],
    metric: Annotated[Optional[str], typer.Option(
        "--metric", help="ms, tflops or speedup: the one per-seqlen figure to draw "
                         "(default: all three).", show_default=False)] = None,
    formats: Annotated[str, typer.Option(
        "--format", help="Comma-separated figure formats: png, svg.")] = "png",
    out: Annotated[Optional[Path], typer.Option(
        "--out", parser=path_flag("--out", "the directory for the figures ('.' for this one)"),
        help="Directory for the figures (default: PATH).", show_default=False)] = None,
) -> None:
    """Draw latency, speedup, TFLOP/s and speedup-vs-density figures, a roofline per run, the
    break-even density of a density sweep, and tuning heatmaps."""
    # Imported here so that `dkbench --help` and the other commands never load matplotlib.
    from ..report.plots import SkippedFigure, plot_path

    skipped: list[SkippedFigure] = []
    try:
        written = plot_path(path, metric=metric, formats=formats, out=out, skipped=skipped)
    except DkbenchError as err:
        raise fail(err) from None
    console = Console()
    console.print(f"wrote {len(written)} figure files:", markup=False)
    for file in written:
        console.print(f"  {file}", markup=False, highlight=False, soft_wrap=True)
    for figure in skipped:
        console.print(f"skipped {figure.name}: {figure.reason}", markup=False, highlight=False,
                      soft_wrap=True)


def report(
    path: Annotated[Path, typer.Argument(parser=path_flag("PATH", _PATH_ALLOWED), help=_PATH_HELP,
                                         show_default=False)],
    out: Annotated[Optional[Path], typer.Option(
        "--out", parser=path_flag("--out", "the Markdown file, or a directory for report.md"),
        help="The Markdown file to write, figures beside it; a directory (one that exists, "
             "or a new path without a suffix) gets report.md (default: PATH/report.md).",
        show_default=False)] = None,
) -> None:
    """Write a Markdown report: environment, summary tables, failed rows and figures."""
    from ..report.page import write_report

    try:
        written = write_report(path, out=out)
    except DkbenchError as err:
        raise fail(err) from None
    Console().print(f"wrote {written}", markup=False, highlight=False, soft_wrap=True)
