"""The break-even figure of a density sweep: per shape (mode, dtype, seqlen), the bundled kernel's
median time against density, the fastest dense provider's time as a flat line, and the density
below which the kernel wins, marked and shaded (`dkbench.report.density`)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from matplotlib.figure import Figure

from ..names import BUNDLED_PROVIDER
from .breakeven import ALWAYS, CROSSES
from .density import DensityFacet

_OURS_COLOR, _DENSE_COLOR, _WIN_COLOR = "tab:blue", "black", "tab:green"


def skip_reason(facets: Sequence[DensityFacet]) -> str | None:
    """Why the figure is not drawn although the run has a density sweep, else None."""
    if not any(f.dense_ms is not None for f in facets):
        return "no dense provider ran ok beside the density sweep: nothing to break even with"
    return None


def _title(facet: DensityFacet, runs: int) -> str:
    """The facet's shape, then its verdict: "break-even 0.4", "always (...)"."""
    key = facet.key
    seqlen = key.get("seqlen")
    tokens = f"{int(seqlen) // 1024}k" if seqlen and int(seqlen) % 1024 == 0 else f"{seqlen}"
    parts = [str(key.get("mode", "")), str(key.get("dtype", "")), f"seqlen {tokens}"]
    head = textwrap.fill(facet.run, 50) + "\n" if runs > 1 else ""
    result = facet.result
    verdict = "" if result is None else "\n" + textwrap.fill(f"break-even: {result.text()}", 48)
    return head + " · ".join(p for p in parts if p) + verdict


def _draw(ax, facet: DensityFacet) -> None:
    xs, ys = zip(*facet.ours)
    ax.plot(xs, ys, color=_OURS_COLOR, marker="o", label=BUNDLED_PROVIDER, gid="ours")
    result = facet.result
    if result is None:
        ax.text(0.5, 0.9, "no dense provider ran ok", transform=ax.transAxes, ha="center",
                color="0.4")
    else:
        ax.axhline(facet.dense_ms, color=_DENSE_COLOR, linestyle="--", gid="dense",
                   label=f"fastest dense: {facet.dense_provider}")
        if result.verdict == CROSSES:
            ax.axvline(result.density, color=_WIN_COLOR, linestyle=":", gid="break-even",
                       label="break-even density")
            ax.axvspan(result.lowest, result.density, color=_WIN_COLOR, alpha=0.12, linewidth=0)
        elif result.verdict == ALWAYS:
            ax.axvspan(result.lowest, result.highest, color=_WIN_COLOR, alpha=0.12, linewidth=0)
    ax.set_xlabel("density (fraction of blocks computed)")
    ax.set_ylabel("median ms")
    values = [*ys, *([facet.dense_ms] if facet.dense_ms else [])]
    if min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)


def build_breakeven_figure(facets: Sequence[DensityFacet], subtitle: str) -> Figure:
    """One subplot per facet, a legend for the figure; ``subtitle`` names the run(s)."""
    ncols = min(3, len(facets))
    nrows = math.ceil(len(facets) / ncols)
    fig = Figure(figsize=(4.6 * ncols + 0.8, 3.4 * nrows + 1.6), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[len(facets):]:
        fig.delaxes(ax)
    runs = len({f.run for f in facets})
    for ax, facet in zip(axes, facets):
        _draw(ax, facet)
        ax.set_title(_title(facet, runs), fontsize="medium")
    handles: dict[str, object] = {}
    for ax in axes[:len(facets)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=min(4, len(handles)), fontsize="small")
    fig.suptitle(f"Break-even density: {BUNDLED_PROVIDER} against the fastest dense provider\n"
                 + textwrap.fill(subtitle, 110))
    return fig
