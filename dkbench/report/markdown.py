"""Markdown tables, for the report and the gate's CI comment alike."""

from __future__ import annotations

import math
from typing import Sequence


def cell(value: object) -> str:
    """A value as one Markdown table cell: pipes escaped, one line, missing as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    text = " ".join(str(value).split())
    return text.replace("|", "\\|") or "—"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table: the header, its rule, one line per row."""
    lines = ["| " + " | ".join(cell(h) if h else "" for h in header) + " |",
             "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
