"""`dkbench gate`: fail CI when throughput drops against a baseline run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import BadInputError, DkbenchError, RegressionError
from ..gate.compare import (
    FAILED,
    IMPROVED,
    REGRESSION,
    SKIPPED,
    GateResult,
    parse_tolerance,
    results_csv,
    run_gate,
)
from ..gate.render import TABLE_HEADER, table_rows, to_markdown
from ..results.schema import META_FILE
from .errors import fail, path_flag

_STYLES = {FAILED: "bold red", REGRESSION: "bold red", IMPROVED: "green", SKIPPED: "yellow"}


def _fit(text: str, console: Console) -> str:
    """``text`` as the console can print it: a stdout that cannot encode "±" or a provider's
    name (PYTHONIOENCODING=ascii) gets "+-" and escapes instead of a UnicodeEncodeError."""
    encoding = console.encoding or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        text = text.replace("±", "+-").encode(encoding, "backslashreplace").decode(encoding)
    return text


def _render(result: GateResult, console: Console) -> None:
    title = f"dkbench gate: {result.metric}" + (
        f" vs {result.against}" if result.metric == "speedup" else "")
    table = Table(title=Text(_fit(title, console)))
    for name in TABLE_HEADER:
        # fold: a narrow terminal wraps a long case label rather than cutting it at "…"
        table.add_column(name, justify="right" if name in ("baseline", "current", "change",
                                                           "noise") else "left", overflow="fold")
    for cells in table_rows(result):
        verdict = cells[-1].split(" ", 1)[0].lower()
        # Text, not markup: a provider, pattern or failure message may hold "[/x]" or "[bold]".
        table.add_row(*(Text(_fit(c, console)) for c in cells), style=_STYLES.get(verdict))
    console.print(table)
    if result.one_sided:
        console.print("[bold]Rows on one side only:[/bold]")
        for o in result.one_sided:
            console.print(f"  {o.case} / {o.provider}: only in {o.side} ({o.status})",
                          markup=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {note}", style="yellow", markup=False, soft_wrap=True)
    console.print(result.summary(), style="bold green" if result.passed else "bold red",
                  markup=False, soft_wrap=True)


def gate(
    current: Annotated[Path, typer.Argument(
        parser=path_flag("CURRENT", "a run directory or results CSV ('.' for this one)"),
        help="Run directory (holding results.csv) or results CSV to check.")],
    baseline: Annotated[Path, typer.Option(
        "--baseline", "-b",
        parser=path_flag("--baseline", "a run directory or results CSV ('.' for this one)"),
        help="Run directory or results CSV to compare against.")],
    metric: Annotated[str, typer.Option(
        help="speedup (vs a provider of the same run; higher is better), tflops (higher is "
             "better) or ms (lower is better).")] = "speedup",
    against: Annotated[Optional[str], typer.Option(
        help="Provider the speedup is measured against (default: the rows' `baseline` column).",
        show_default=False)] = None,
    tolerance: Annotated[str, typer.Option(
        help="Allowed worsening in percent: '5%' and '5' both mean 5 percent "
             "(so '0.05' means 0.05 percent).")] = "5%",
    providers: Annotated[Optional[str], typer.Option(
        help="Comma-separated providers to gate (default: all).", show_default=False)] = None,
    fail_on_missing: Annotated[bool, typer.Option(
        "--fail-on-missing", help="Fail when a row is present on one side only.")] = False,
    markdown: Annotated[Optional[Path], typer.Option(
        parser=path_flag("--markdown", "the file to write the Markdown to"),
        help="Also write the table as Markdown to this file (for a CI comment).",
        show_default=False)] = None,
) -> None:
    """Compare CURRENT against --baseline; exit 0 pass, 1 regression, 2 bad input (or no row
    compared: never a pass).

    A row timed while its GPU was throttled (median SM clock more than 10% below its run's) is
    skipped on either side, never failed: rerun it."""
    try:
        if markdown is not None:
            _check_markdown(markdown, (current, baseline))
        result = run_gate(
            current, baseline, metric=metric, against=against,
            tolerance=parse_tolerance(tolerance),
            providers=providers.split(",") if providers is not None else None,
            fail_on_missing=fail_on_missing)
        _check_not_itself(current, baseline)
        _render(result, Console())
        if markdown is not None:
            try:
                markdown.write_text(to_markdown(result), encoding="utf-8")
            except OSError as err:
                raise BadInputError(f"--markdown {markdown}: cannot write "
                                    f"({err.strerror or err})") from None
        if result.nothing_compared:
            raise BadInputError(result.nothing_reason())
    except DkbenchError as err:
        raise fail(err) from None
    if not result.passed:
        raise typer.Exit(code=RegressionError.exit_code)


def _check_not_itself(current: Path, baseline: Path) -> None:
    """Refuse a run gated against itself: every row equals its baseline, so the gate would pass
    whatever the run measured (a CI variable left unset, the same path pasted twice)."""
    csv_path = results_csv(current)
    if csv_path.resolve() == results_csv(baseline).resolve():
        raise BadInputError(f"current {current} and --baseline {baseline} are the same results "
                            f"file ({csv_path}): a run compared with itself always passes; give "
                            "as --baseline the run to compare against")


def _check_markdown(path: Path, inputs: tuple[Path, Path]) -> None:
    """Refuse a --markdown that cannot be written before anything is read (and not only after
    the table has been printed), or that names a file of the runs being gated."""
    if path.is_dir():
        raise BadInputError(f"--markdown {path}: is a directory; give the file to write")
    if path.exists() and not path.is_file():  # a fifo would block the write with no reader
        raise BadInputError(f"--markdown {path}: is not a regular file (a fifo, socket or "
                            "device); give the file to write")
    for given in inputs:
        csv_path = results_csv(given)
        # Writing the table there would replace the run's rows (or its meta.json) with Markdown.
        for owned in (csv_path, csv_path.parent / META_FILE):
            if path.resolve() == owned.resolve():
                raise BadInputError(f"--markdown {path}: is {owned}, a file of the run {given} "
                                    "being gated; pick another file for the Markdown")
    parent = path.parent
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        raise BadInputError(f"--markdown {path}: its directory {parent} {what}")
