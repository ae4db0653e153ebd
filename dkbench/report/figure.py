"""A figure as the report and `dkbench plot` handle it: built, named, saved."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from ..errors import BadInputError

# Colours for providers: tab10, then its lighter twins (tab20's odd entries), then tab20b: thirty
# colours before one repeats, where tab10 alone gave an 11th provider the 1st one's colour (a run
# of the default sweep has 11), two series one could not tell apart.
_TAB20 = matplotlib.colormaps["tab20"].colors
PALETTE = (*matplotlib.colormaps["tab10"].colors, *_TAB20[1::2],
           *matplotlib.colormaps["tab20b"].colors)


def colors(n: int) -> list:
    """``n`` colours, all different: `PALETTE`, then evenly spaced hues past its end."""
    if n <= len(PALETTE):
        return list(PALETTE[:n])
    extra = n - len(PALETTE)
    hsv = matplotlib.colormaps["hsv"]
    return [*PALETTE, *(hsv(i / extra)[:3] for i in range(extra))]


@dataclass(frozen=True)
class NamedFigure:
    """A built figure, the file stem it is saved under, and a title for links."""

    name: str
    title: str
    figure: Figure


def slug(text: str) -> str:
    """A file-name-safe form of `text`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def unique_names(figures: Sequence[NamedFigure]) -> list[NamedFigure]:
    """``figures`` with names that differ (also in case, for a case-blind file system): a name
    seen before gets _2, _3, ... So that two case ids that slug alike ("a/b", "a_b") are saved
    as two files, not one over the other."""
    seen: set[str] = set()
    out = []
    for nf in figures:
        name, n = nf.name, 1
        while name.casefold() in seen:
            n += 1
            name = f"{nf.name}_{n}"
        seen.add(name.casefold())
        out.append(nf if name == nf.name else NamedFigure(name, nf.title, nf.figure))
    return out


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
                with written_whole(path) as tmp:
                    nf.figure.savefig(tmp, dpi=110, format=fmt)
                written.append(path)
    except OSError as err:
        raise BadInputError(f"{out_dir}: cannot write figures ({err.strerror or err})") from None
    return written


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A file beside ``path`` for the block to write; renamed over ``path`` when the block ends
    well, removed when it does not: a crash leaves the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
