"""A figure as the report and `dkbench plot` handle it: built, named, saved."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ..errors import BadInputError


@dataclass(frozen=True)
class NamedFigure:
    """A built figure, the file stem it is saved under, and a title for links."""

    name: str
    title: str
    figure: Figure


def slug(text: str) -> str:
    """A file-name-safe form of `text`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def save_figures(figures: Sequence[NamedFigure], out_dir: Path,
                 formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write each figure once per format as OUT_DIR/NAME.FORMAT; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for nf in figures:
            for fmt in formats:
                path = out_dir / f"{nf.name}.{fmt}"
                nf.figure.savefig(path, dpi=110)
                written.append(path)
    except OSError as err:
        raise BadInputError(f"{out_dir}: cannot write figures ({err.strerror or err})") from None
    return written
