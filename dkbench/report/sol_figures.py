"""The figures that place rows against the speed of light: a roofline per run (`roofline`) and,
when the runs hold a density sweep, the break-even density (`breakeven_plot`). A figure that
cannot be drawn becomes a `SkippedFigure` saying why, for `dkbench plot` to print and the report
to list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from ..results.runs import INTERPRETER_NOTE, Run
from . import roofline
from .breakeven_plot import build_breakeven_figure
from .breakeven_plot import skip_reason as breakeven_skip_reason
from .density import density_facets
from .figure import NamedFigure, slug


@dataclass(frozen=True)
class SkippedFigure:
    """A figure that was not drawn, and why."""

    name: str
    title: str
    reason: str


def speed_of_light_figures(runs: Sequence[Run], frame: pd.DataFrame,
                           skipped: list[SkippedFigure]) -> list[NamedFigure]:
    """A roofline per run, and the break-even figure when ``frame`` (the runs' results) holds a
    density sweep; those that cannot be drawn are appended to ``skipped``."""
    figures = []
    many = len(runs) > 1
    for run in runs:
        name = f"roofline_{slug(run.path.resolve().name)}" if many else "roofline"
        title = f"Roofline, {run.label}" if many else "Roofline"
        reason = roofline.skip_reason(run)
        if reason:
            skipped.append(SkippedFigure(name, title, reason))
        else:
            figures.append(NamedFigure(name, title, roofline.build_roofline(run)))
    facets = density_facets(frame)
    reason = breakeven_skip_reason(facets) if facets else None
    if reason:
        skipped.append(SkippedFigure("breakeven", "Break-even density", reason))
    elif facets:
        subtitle = "; ".join(r.label for r in runs)
        if any(r.interpreter for r in runs):
            subtitle += f" ({INTERPRETER_NOTE})"
        figures.append(NamedFigure("breakeven", "Break-even density",
                                   build_breakeven_figure(facets, subtitle)))
    return figures
