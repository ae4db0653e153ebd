"""Markdown tables, for the report and the gate's CI comment alike.

Text from a results file (a message, a provider, a pattern label, a run's name) is shown as the
text it is: `escape` backslash-escapes what Markdown or GitHub would read as markup (a pipe that
would split a table cell, a backtick opening a code span, ``<`` opening HTML or a comment, ``*``
and ``_`` emphasis, brackets of a link, ``$`` of GitHub's math), and folds it onto one line. Text
that is Markdown already (written by the report itself) is an `Md` and passes through.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

# ASCII punctuation that CommonMark, GFM (tables, strikethrough) or GitHub (math) may read as
# markup; an underscore only where it could open or close emphasis (not inside a word), and ">"
# not at all (it quotes only at the start of a line, and "<" is escaped).
_MARKUP = re.compile(r"[\\`*\[\]<|~$&#]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


class Md(str):
    """Text that is Markdown already: `cell` and `table` keep it as written."""


def one_line(value: object) -> str:
    """``value`` as text on one line, runs of whitespace (newlines too) folded to one space."""
    return " ".join(str(value).split())


def escape(value: object) -> Md:
    """``value`` as Markdown that renders as its text, on one line."""
    return Md(_MARKUP.sub(lambda m: "\\" + m.group(0), one_line(value)))


def code(value: object, in_table: bool = False) -> Md:
    """``value`` as a code span on one line, whatever backticks it holds (a fence longer than its
    longest run of them); ``in_table``: its pipes escaped, as a table cell needs them."""
    text = one_line(value)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    if in_table:
        text = text.replace("|", "\\|")
    return Md(f"{fence}{pad}{text}{pad}{fence}")


def cell(value: object) -> str:
    """A value as one Markdown table cell: its text escaped (`escape`), on one line, missing as
    a dash; an `Md` as written, on one line."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
        value = int(value)  # 8192, not the 8192.0 of a column with an empty cell
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    text = one_line(value) if isinstance(value, Md) else escape(value)
    return text or "—"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table: the header, its rule, one line per row."""
    lines = ["| " + " | ".join(cell(h) if h else "" for h in header) + " |",
             "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
