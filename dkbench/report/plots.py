"""Figures drawn from run directories: latency, speedup and TFLOP/s against sequence length, speedup
against density, a roofline per run (`roofline`), the break-even density of a density sweep
(`breakeven_plot`), and (in `tune_plots`) launch-config heatmaps.

Plots are views of the CSVs alone (results.csv, meta.json and tune.csv in a run directory, or
tune.csv and meta.json in a directory `dkbench tune` wrote).
`dkbench.results.runs.load_sources` reads and checks them, `build_figures` returns matplotlib Figures
(tests inspect them), `save_figures` writes them, and `plot_path` does all three for the CLI.
Only `dkbench.report`'s figure modules import matplotlib, so `import dkbench` stays light.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: CI and the GPU machine have no display

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

from ..errors import BadInputError
from ..results.runs import (
    INTERPRETER_NOTE,
    METRICS,
    Run,
    TuneDir,
    check_metric,
    load_sources,
    parse_formats,
)
from ..results.schema import check_out_dir
from .figure import NamedFigure, colors, save_figures, slug, unique_names
from .sol_figures import SkippedFigure, speed_of_light_figures
from .tune_plots import build_tune_figures

FACET_COLUMNS = ("pattern", "mode", "dtype")
# Shape columns that split a facet further when a sweep varies them (else lines would mix shapes).
SHAPE_COLUMNS = {"batch": "b", "heads": "h", "kv_heads": "kv", "head_dim": "d",
                 "block_size": "block", "causal": "causal", "tokens": "tokens",
                 "page_size": "page"}
FAILED_MARKERS = {"oom": "x", "error": "X", "unsupported": "1", "wrong": "v"}
# Facets in one figure at most (8 rows of 3): a sweep of hundreds of shapes gets several figures,
# each readable, where one would be metres tall and, past about 600 facets, more than the 2^16
# pixels a side that Agg can draw.
FACETS_PER_FIGURE = 24
FAILURE_BAND = 0.16  # axes fraction at the bottom of each subplot kept for failure markers
_RUN_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))
_REFERENCE_STYLES = ("--", ":", "-.", (0, (6, 2, 1, 2)))  # per run, for the baseline's dense rate


# -- line figures --

@dataclass(frozen=True)
class _View:
    """What one faceted line figure draws."""

    name: str
    title: str
    column: str
    ylabel: str
    x: str = "seqlen"
    xlabel: str = "sequence length (tokens)"
    facets: tuple[str, ...] = FACET_COLUMNS
    skip_baseline: bool = False  # the baseline is drawn as a reference line instead
    band: tuple[str, str] | None = None  # p20/p80 drawn as a shaded band
    markers_only: bool = False


VIEWS = {
    "ms": _View("latency", "Latency against sequence length", "ms", "median latency (ms)",
                band=("ms_p20", "ms_p80")),
    "speedup": _View("speedup", "Speedup against the baseline provider", "speedup",
                     "speedup vs {baseline} (×)", skip_baseline=True),
    "tflops": _View("tflops", "Throughput on computed pairs", "tflops",
                    "TFLOP/s (computed pairs)", skip_baseline=True),
}
DENSITY_VIEW = _View("speedup_vs_density", "Speedup against block density", "speedup",
                     "speedup vs {baseline} (×)", x="density",
                     xlabel="density (fraction of blocks computed)", facets=("mode", "dtype"),
                     skip_baseline=True, markers_only=True)


class _Styles:
    """Colour per provider, line style and marker per run, fixed across every figure."""

    def __init__(self, frame: pd.DataFrame):
        providers = sorted(frame["provider"].unique())
        self.providers = dict(zip(providers, colors(len(providers))))
        self.runs = {r: i for i, r in enumerate(dict.fromkeys(frame["run"]))}
        self.compare = len(self.runs) > 1

    def label(self, provider: str, run: str) -> str:
        return f"{provider} · {run}" if self.compare else provider

    def line(self, provider: str, run: str) -> dict:
        ls, marker = _RUN_STYLES[self.runs[run] % len(_RUN_STYLES)]
        return {"color": self.providers[provider], "linestyle": ls, "marker": marker}


def _fmt_tokens(n: float, _pos=None) -> str:
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _spans(values: pd.Series, ratio: float) -> bool:
    v = values.dropna()
    return bool(len(v)) and bool((v > 0).all()) and v.max() / v.min() >= ratio


def _log_labels(axis, values: pd.Series) -> None:
    """Plain numbers on a log axis (not 6x10^0); minor labels at 2 and 5 over few decades."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    v = values.dropna()
    if math.log10(v.max() / v.min()) >= 2:
        axis.set_minor_formatter(NullFormatter())
        return

    def two_five(v: float, _pos=None) -> str:
        return f"{v:g}" if round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ""
    axis.set_minor_formatter(FuncFormatter(two_five))


def _set_scales(ax: Axes, xs: pd.Series, ys: pd.Series, view: _View) -> None:
    """Log axes where the data spans decades (x by powers of two for sequence lengths)."""
    if view.x == "seqlen" and _spans(xs, 4):
        ax.set_xscale("log", base=2)
        ticks = sorted(xs.dropna().unique())
        if len(ticks) <= 10:
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(_fmt_tokens))
    elif view.x != "seqlen" and _spans(xs, 10):
        ax.set_xscale("log")
        _log_labels(ax.xaxis, xs)
    if _spans(ys, 10):
        ax.set_yscale("log")
        _log_labels(ax.yaxis, ys)


def _failure_band(ax: Axes, fraction: float) -> None:
    """Lower the y axis so that its bottom `fraction` is a grey band holding only failure markers,
    with no y ticks in it: a marker there must never read as a value (say, 0 TFLOP/s)."""
    ax.autoscale_view()
    data_lo, data_hi = ax.get_ylim()
    scale = ax.yaxis.get_transform()  # identity or log: the space the axis is linear in
    lo, hi = scale.transform(np.array([data_lo, data_hi]))
    bottom = scale.inverted().transform(np.array([lo - (hi - lo) * fraction / (1 - fraction)]))[0]
    major = [t for t in ax.get_yticks() if data_lo <= t <= data_hi]
    minor = [t for t in ax.yaxis.get_minorticklocs() if data_lo <= t <= data_hi]
    ax.set_ylim(bottom, data_hi)
    ax.set_yticks(major)
    ax.set_yticks(minor, minor=True)
    ax.add_patch(Rectangle((0, 0), 1, fraction, transform=ax.transAxes, facecolor="0.93",
                           edgecolor="none", zorder=0, gid="failed-band"))


def _draw_failed(ax: Axes, rows: pd.DataFrame, x: str, styles: _Styles) -> None:
    """Failed rows as status markers along the axis bottom, never as numbers; providers stagger
    a little in height so two failures at one x stay visible."""
    bad = rows[(rows["status"] != "ok") & rows[x].notna()]
    for (status, provider, run), g in bad.groupby(["status", "provider", "run"]):
        height = FAILURE_BAND * (0.2 + 0.3 * (list(styles.providers).index(provider) % 3))
        ax.plot(g[x], np.full(len(g), height), transform=ax.get_xaxis_transform(), linestyle="none",
                marker=FAILED_MARKERS.get(status, "x"), markersize=9, markeredgewidth=2,
                color=styles.providers[provider], clip_on=False, gid="failed")


def _draw_references(ax: Axes, rows: pd.DataFrame, ok: pd.DataFrame, view: _View,
                     styles: _Styles) -> None:
    if view.column == "speedup":
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="baseline (= 1)",
                   gid="reference")
    positive = ok.loc[ok["density"] > 0, "density"] if view.x == "density" else ok.iloc[0:0]
    if len(positive):  # 1 / density: a density of 0 (an edited file) has no ideal to draw
        xs = np.geomspace(positive.min(), positive.max(), 50)
        ax.plot(xs, 1 / xs, color="0.45", linestyle=":", label="ideal (1 / density)",
                gid="reference")
    if view.column == "tflops":
        base = rows[(rows["provider"] == rows["baseline"]) & (rows["status"] == "ok")]
        for (run, provider), g in base.dropna(subset=["dense_tflops"]).groupby(["run", "provider"]):
            g = g.groupby("seqlen", as_index=False)["dense_tflops"].median()
            label = f"{provider} dense rate (reference)" + (f" · {run}" if styles.compare else "")
            ls = _REFERENCE_STYLES[styles.runs[run] % len(_REFERENCE_STYLES)]
            ax.plot(g["seqlen"], g["dense_tflops"], color="black", linestyle=ls,
                    linewidth=1.5, label=label, gid="reference")


def _draw_facet(ax: Axes, rows: pd.DataFrame, view: _View, styles: _Styles) -> None:
    ok = rows[(rows["status"] == "ok") & rows[view.column].notna() & rows[view.x].notna()]
    if view.skip_baseline:
        ok = ok[ok["provider"] != ok["baseline"]]
    value_cols = [view.column, *(view.band or ())]
    for (provider, run), g in ok.groupby(["provider", "run"], sort=True):
        # Repeated rows (a resumed run) collapse to their median.
        g = g.groupby(view.x, as_index=False)[value_cols].median().sort_values(view.x)
        style = styles.line(provider, run)
        if view.markers_only:
            style["linestyle"] = "none"
        ax.plot(g[view.x], g[view.column], label=styles.label(provider, run), gid="data", **style)
        if view.band:
            ax.fill_between(g[view.x], g[view.band[0]], g[view.band[1]], color=style["color"],
                            alpha=0.15, linewidth=0)
    _draw_references(ax, rows, ok, view, styles)
    _draw_failed(ax, rows, view.x, styles)
    if ok.empty:
        ax.text(0.5, 0.5, f"no ok rows with {view.column}", transform=ax.transAxes, ha="center",
                va="center", color="0.4")
    ys = ok[view.column]
    if view.column == "speedup":
        ys = pd.concat([ys, pd.Series([1.0])])  # the reference line at 1 must fit on the axis
    _set_scales(ax, rows[view.x], ys, view)
    references = any(line.get_gid() == "reference" for line in ax.get_lines())
    if (rows["status"] != "ok").any() and (len(ok) or references):
        _failure_band(ax, FAILURE_BAND)
    elif ok.empty:
        # Nothing measured on this axis: ticks there would give the failure markers a value
        # (a negative ms around matplotlib's default limits).
        ax.set_yticks([])
        ax.set_yticks([], minor=True)
    ax.grid(True, which="major", alpha=0.3)


def _facet_title(key: dict) -> str:
    head = textwrap.fill(str(key.pop("pattern")), 42) + "\n" if "pattern" in key else ""
    parts = [str(key.pop("mode", "")), str(key.pop("dtype", ""))]
    parts += [f"{SHAPE_COLUMNS[c]}={v}" for c, v in key.items()]
    return head + " · ".join(p for p in parts if p)


def _suptitle(title: str, runs: Sequence[Run]) -> str:
    which = runs[0].label if len(runs) == 1 else "runs: " + "; ".join(r.label for r in runs)
    lines = [title, which]
    if any(r.interpreter for r in runs):
        lines.append(INTERPRETER_NOTE)
    return "\n".join(textwrap.fill(line, 110) for line in lines)


def _short(message: str, width: int = 44) -> str:
    line = " ".join(str(message).splitlines()[0].split()) if str(message).strip() else ""
    return line if len(line) <= width else line[:width - 1].rstrip() + "…"


def failure_note(rows: pd.DataFrame) -> str | None:
    """What failed of one provider's rows: "2 of 4 failed", or when none ran ok its (most
    common) status and a short reason, "unsupported: needs a CUDA GPU"; None when all ran ok."""
    bad = rows[rows["status"] != "ok"]
    if bad.empty:
        return None
    if len(bad) < len(rows):
        return f"{len(bad)} of {len(rows)} failed"
    messages = bad["message"] if "message" in bad.columns else pd.Series("", index=bad.index)
    (status, message), _ = Counter(zip(bad["status"], messages.fillna(""))).most_common(1)[0]
    text = f"{status}: {_short(message)}" if _short(message) else status
    return text if bad["status"].nunique() == 1 else f"all {len(bad)} failed; {text}"


def _failure_entries(frame: pd.DataFrame, styles: _Styles) -> dict[str, Line2D]:
    """A legend entry per provider (and run) with failed rows, saying how many or why, in the
    provider's colour with the marker of its commonest failure."""
    entries = {}
    for provider, run in ((p, r) for p in styles.providers for r in styles.runs):
        rows = frame[(frame["provider"] == provider) & (frame["run"] == run)]
        note = failure_note(rows) if len(rows) else None
        if note is None:
            continue
        status = rows.loc[rows["status"] != "ok", "status"].mode().iloc[0]
        entries[f"{styles.label(provider, run)} ({note})"] = Line2D(
            [], [], linestyle="none", color=styles.providers[provider],
            marker=FAILED_MARKERS.get(status, "x"), markersize=8, markeredgewidth=2)
    return entries


def undrawn(frame: pd.DataFrame, view: _View) -> pd.DataFrame:
    """The ok rows that `view` would draw but cannot: no value in its column or on its x axis
    (a speedup whose baseline failed, a TFLOP/s or a sequence length left empty)."""
    ok = frame[frame["status"] == "ok"]
    if view.skip_baseline:
        ok = ok[ok["provider"] != ok["baseline"]]
    return ok[ok[view.column].isna() | ok[view.x].isna()]


def _undrawn_entries(frame: pd.DataFrame, view: _View, styles: _Styles) -> dict[str, Line2D]:
    """A legend entry per provider (and run) with ok rows not drawn, saying how many and why, so
    that a missing point never reads as a row that was not run."""
    entries = {}
    missing = undrawn(frame, view)
    for (provider, run), g in missing.groupby(["provider", "run"], sort=True):
        lacks = [c for c in (view.column, view.x) if g[c].isna().any()]
        n = len(g)
        label = (f"{styles.label(provider, run)} ({n} ok row{'s' * (n != 1)} without "
                 f"{' or '.join(lacks)}: not drawn)")
        entries[label] = Line2D([], [], linestyle="none", marker="o", fillstyle="none",
                                color=styles.providers[provider], markersize=8)
    return entries


def _figure_legend(fig: Figure, axes: Sequence[Axes], frame: pd.DataFrame, styles: _Styles,
                   view: _View | None = None) -> None:
    """One legend for the whole figure, below the grid so it never hides data or the title:
    series in provider order, then reference lines, then per provider with failed rows how many
    failed (or why, when none ran ok), then one entry per failure status."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    series = [styles.label(p, r) for p in styles.providers for r in styles.runs]
    handles = {k: seen[k] for k in series if k in seen}
    handles.update({k: h for k, h in seen.items() if k not in handles})
    handles.update(_failure_entries(frame, styles))
    if view is not None:
        handles.update(_undrawn_entries(frame, view, styles))
    for status in sorted(set(frame["status"]) - {"ok"}):
        handles[f"failed ({status})"] = Line2D([], [], linestyle="none", color="0.3",
                                               marker=FAILED_MARKERS.get(status, "x"),
                                               markersize=8, markeredgewidth=2)
    if not handles:
        return
    longest = max(len(k) for k in handles)
    ncols = max(1, min(4, len(handles), int(fig.get_figwidth() * 12 / (longest + 6))))
    fig.set_figheight(fig.get_figheight() + 0.25 * math.ceil(len(handles) / ncols))
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
               ncols=ncols, fontsize="small")


def _facet_grid(n: int) -> tuple[Figure, list[Axes]]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.6 * ncols + 0.8, 3.4 * nrows + 1.2), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n]


_MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd_bwd": 2, "prefill_varlen": 3, "decode": 4}


def _facet_order(key: tuple, facets: Sequence[str]) -> tuple:
    """Facets sorted by value, but modes in pipeline order (fwd before bwd) rather than A-Z."""
    return tuple((_MODE_ORDER.get(v, 9), str(v)) if c == "mode" else (0, v)
                 for c, v in zip(facets, key))


def build_view_figures(frame: pd.DataFrame, view: _View, runs: Sequence[Run]) -> list[Figure]:
    """The figures of `view`, a subplot per facet and at most `FACETS_PER_FIGURE` facets to a
    figure; `frame` is the runs' results concatenated."""
    styles = _Styles(frame)
    if "batch" in frame.columns:  # like every shape column, optional
        frame = frame.assign(tokens=frame["batch"] * frame["seqlen"])
    varying = [c for c in SHAPE_COLUMNS if c in frame.columns and frame[c].nunique() > 1]
    if "batch" in varying and frame["tokens"].nunique() < frame["batch"].nunique():
        # A batch_tokens sweep: batch shrinks as seqlen grows, so lines follow the token budget.
        varying.remove("batch")
    else:
        varying = [c for c in varying if c != "tokens"]
    facets = [*view.facets, *varying]
    # dropna=False: a row missing a shape value is drawn in a facet of its own, not dropped.
    groups = sorted(frame.groupby(facets, dropna=False),
                    key=lambda kv: _facet_order(kv[0], facets))
    pages = [groups[i:i + FACETS_PER_FIGURE] for i in range(0, len(groups), FACETS_PER_FIGURE)]
    baselines = sorted({b for b in frame["baseline"] if b})
    ylabel = view.ylabel.format(baseline=baselines[0] if len(baselines) == 1 else "baseline")
    figures = []
    for number, page in enumerate(pages, start=1):
        fig, axes = _facet_grid(len(page))
        for ax, (key, rows) in zip(axes, page):
            _draw_facet(ax, rows, view, styles)
            ax.set_title(_facet_title(dict(zip(facets, key))), fontsize="medium")
            ax.set_xlabel(view.xlabel)
            ax.set_ylabel(ylabel)
        fig.suptitle(_suptitle(page_title(view.title, number, len(pages)), runs))
        _figure_legend(fig, axes, frame, styles, view)
        figures.append(fig)
    return figures


def _view_figures(frame: pd.DataFrame, view: _View, runs: Sequence[Run]) -> list[NamedFigure]:
    """`view`'s figures named: NAME, or NAME_1, NAME_2, ... when its facets fill several (NAME_01
    from ten on, so that the files sort in order)."""
    figures = build_view_figures(frame, view, runs)
    if len(figures) == 1:
        return [NamedFigure(view.name, view.title, figures[0])]
    width = len(str(len(figures)))
    return [NamedFigure(f"{view.name}_{i:0{width}d}", page_title(view.title, i, len(figures)),
                        fig) for i, fig in enumerate(figures, start=1)]


def page_title(title: str, number: int, pages: int) -> str:
    """A view's title on page ``number`` of ``pages``: with "(i of n)" when it has several."""
    return f"{title} ({number} of {pages})" if pages > 1 else title


def build_figures(runs: Sequence[Run], metric: str | None = None,
                  tunes: Sequence[TuneDir] = (),
                  skipped: list[SkippedFigure] | None = None) -> list[NamedFigure]:
    """The figures for `runs`: per-seqlen figures (all three, or only `metric`), speedup against
    density, a roofline per run, the break-even density of a density sweep, and a heatmap per
    tuned case and kernel where a run has a tune.csv and for each of `tunes` (directories written
    by `dkbench tune`). A figure that cannot be drawn (a roofline without a calibration) is
    appended to `skipped`, when given, with the reason. Text in them is text: a "$" in a name
    or a message is not matplotlib's math (which would draw "$x_1$" as a subscript, and fail on
    "$\\frac$"); figure names are made unique (`unique_names`)."""
    with matplotlib.rc_context({"text.parse_math": False}):
        return unique_names(_build_figures(runs, metric, tunes, skipped))


def _build_figures(runs: Sequence[Run], metric: str | None, tunes: Sequence[TuneDir],
                   skipped: list[SkippedFigure] | None) -> list[NamedFigure]:
    figures = []
    if runs:
        frame = pd.concat([r.results for r in runs], ignore_index=True)
        metrics = METRICS if metric is None else (check_metric(metric),)
        views = _drawable_views([*(VIEWS[m] for m in metrics), DENSITY_VIEW], frame,
                                [] if skipped is None else skipped)
        figures = [nf for v in views for nf in _view_figures(frame, v, runs)]
        figures += speed_of_light_figures(runs, frame, [] if skipped is None else skipped)
    many = len(runs) + len(tunes) > 1
    for source in [*runs, *tunes]:
        if source.tune is not None:
            prefix = f"tune_{slug(source.path.resolve().name)}" if many else "tune"
            tuned = build_tune_figures(source.tune, prefix=prefix, subtitle=source.label,
                                       interpreter=source.interpreter)
            if many:
                tuned = [replace(nf, title=f"{nf.title}, {source.label}") for nf in tuned]
            figures += tuned
    return figures


def _drawable_views(views: list[_View], frame: pd.DataFrame,
                    skipped: list[SkippedFigure]) -> list[_View]:
    """``views`` less the speedup ones when no run has a baseline (appended to ``skipped``): they
    would draw only a "baseline (= 1)" line against a baseline that no run had."""
    if (frame["baseline"].astype(str) != "").any():
        return views
    reason = "no baseline provider in the spec (its baseline key), so no speedups to draw"
    skipped += [SkippedFigure(v.name, v.title, reason) for v in views if v.column == "speedup"]
    return [v for v in views if v.column != "speedup"]


def output_root(path: Path) -> Path:
    """The directory PATH names (a results.csv given directly stands for its run directory)."""
    path = Path(path)
    return path.parent if path.is_file() else path


def plot_path(path: Path, metric: str | None = None, formats: str | Sequence[str] = "png",
              out: Path | None = None,
              skipped: list[SkippedFigure] | None = None) -> list[Path]:
    """`dkbench plot`: read the run and tune directories under `path`, draw, save under `out`
    (default: `path`); figures not drawn go to `skipped` (see `build_figures`)."""
    metric = check_metric(metric)
    formats = parse_formats(formats)
    if out is not None:  # before anything is read or drawn
        check_out_dir(Path(out))
    runs, tunes = load_sources(path)
    if metric is not None and not runs:
        raise BadInputError(f"--metric {metric}: {path} holds tune directories only, and their "
                            "heatmaps (median ms per config) have no metric to pick; drop "
                            "--metric")
    out_dir = Path(out) if out else output_root(path)
    return save_figures(build_figures(runs, metric, tunes, skipped), out_dir, formats)
