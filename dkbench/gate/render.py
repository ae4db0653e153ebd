"""The gate's verdicts as text: the table's cells, and the Markdown of a CI comment."""

from __future__ import annotations

import math

from ..report import markdown
from .compare import FAILED, IMPROVED, PASS, REGRESSION, SKIPPED, Comparison, GateResult


def format_value(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.4g}"


def format_change(change: float) -> str:
    return "-" if not math.isfinite(change) else f"{change * 100:+.1f}%"


def format_noise(noise: float) -> str:
    return "-" if not math.isfinite(noise) else f"±{noise * 100:.1f}%"


def format_verdict(c: Comparison) -> str:
    return c.verdict.upper() + (f" ({c.note})" if c.note else "")


TABLE_HEADER = ("case", "provider", "baseline", "current", "change", "noise", "verdict")


def table_rows(result: GateResult) -> list[tuple[str, ...]]:
    """The compared rows as display strings, regressions first, in `TABLE_HEADER` order."""
    order = {FAILED: 0, REGRESSION: 1, SKIPPED: 2, IMPROVED: 3, PASS: 4}
    return [(c.case, c.provider, format_value(c.baseline), format_value(c.current),
             format_change(c.change), format_noise(c.noise), format_verdict(c))
            for c in sorted(result.comparisons, key=lambda c: order[c.verdict])]


def to_markdown(result: GateResult) -> str:
    """The gate's table, one-side-only rows and verdict as Markdown, for a CI comment."""
    out = [f"### dkbench gate: {result.verdict}", "",
           *markdown.table(TABLE_HEADER, table_rows(result))]
    if result.one_sided:
        out += ["", "Rows on one side only:", ""]
        # Names and notes carry text from the results files: escaped, as in the table's cells.
        esc = markdown.escape
        out += [f"- {esc(o.case)} / {esc(o.provider)}: only in {o.side} ({esc(o.status)})"
                for o in result.one_sided]
    out += [""] + [f"> {markdown.escape(note)}" for note in result.notes]
    out += ["", f"**{result.summary()}**", ""]
    return "\n".join(out)
