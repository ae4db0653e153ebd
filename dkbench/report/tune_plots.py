"""Launch-config heatmaps from a run's tune.csv: one figure per (case_id, kernel), one subplot per
(num_warps, num_stages), BLOCK_M by BLOCK_N cells coloured by median time, the winner outlined."""

from __future__ import annotations

import textwrap

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..results.runs import INTERPRETER_NOTE
from .figure import NamedFigure, slug

# Faster is brighter; grey marks configs that were not run or failed.
_CMAP = matplotlib.colormaps["viridis_r"].with_extremes(bad="0.85")
KERNEL_ORDER = {"fwd": 0, "bwd": 1, "dq": 2, "decode": 3}
_STATUS_SHORT = {"oom": "oom", "error": "err", "unsupported": "unsup", "wrong": "wrong"}


def winner(rows: pd.DataFrame) -> pd.Series | None:
    """The row tune marked best (the config it cached, which need not have the lowest median: the
    default stays unless a config is clearly faster), else the fastest ok row (an older tune.csv
    may lack is_best)."""
    ok = rows[(rows["status"] == "ok") & rows["ms"].notna()]
    if ok.empty:
        return None
    best = ok[ok["is_best"]]
    return best.iloc[0] if len(best) else ok.loc[ok["ms"].idxmin()]


def _norm(ok_ms: pd.Series) -> Normalize:
    # One colour scale for the whole figure so cells compare across subplots.
    if ok_ms.empty:
        return Normalize(0, 1)
    lo, hi = ok_ms.min(), ok_ms.max()
    if lo > 0 and hi / lo >= 10:
        return LogNorm(lo, hi)
    return Normalize(lo, hi if hi > lo else lo * 1.01 + 1e-9)


def _cell_grid(rows: pd.DataFrame, bm: list, bn: list) -> tuple[np.ndarray, dict]:
    """Median ms per (BLOCK_M, BLOCK_N), NaN where missing or failed; the text of those cells."""
    grid = np.full((len(bm), len(bn)), np.nan)
    notes = {(i, j): "not run" for i in range(len(bm)) for j in range(len(bn))}
    for (m, n), g in rows.groupby(["block_m", "block_n"]):
        i, j = bm.index(m), bn.index(n)
        ok = g[(g["status"] == "ok") & g["ms"].notna()]
        if len(ok):
            grid[i, j] = ok["ms"].median()
            del notes[(i, j)]
        else:
            notes[(i, j)] = _STATUS_SHORT.get(g["status"].iloc[0], g["status"].iloc[0] or "?")
    return grid, notes


def _annotate(ax, grid: np.ndarray, notes: dict, norm: Normalize) -> None:
    for (i, j), value in np.ndenumerate(grid):
        if np.isnan(value):
            if (i, j) in notes:
                ax.text(j, i, notes[(i, j)], ha="center", va="center", fontsize="x-small",
                        color="0.2")
            continue
        # Dark text on the bright (fast) end of viridis_r, white on the dark end.
        color = "black" if norm(value) < 0.5 else "white"
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize="x-small", color=color)


def _shape_line(row: pd.Series) -> str:
    parts = [f"{k} {row[c]}" for k, c in (("", "dtype"), ("seqlen", "seqlen"), ("heads", "heads"),
                                          ("kv_heads", "kv_heads"), ("head_dim", "head_dim"),
                                          ("block", "block_size"), ("pattern", "pattern"))
             if c in row.index and pd.notna(row[c])]
    return " · ".join(p.strip() for p in parts)


def _best_line(best: pd.Series | None) -> str:
    if best is None:
        return "no config ran ok"
    text = (f"best: BLOCK_M={best['block_m']:g}, BLOCK_N={best['block_n']:g}, "
            f"num_warps={best['num_warps']:g}, num_stages={best['num_stages']:g}"
            + (f", impl={best['impl']}" if best.get("impl", "triton") != "triton" else "")
            + f": {best['ms']:.3g} ms")
    if "speedup_vs_default" in best.index and pd.notna(best["speedup_vs_default"]):
        text += f" ({float(best['speedup_vs_default']):.2f}× vs the default config)"
    return text


def _impl_of(row: pd.Series) -> str:
    """A row's implementation; triton where tune.csv has none (written before impl was)."""
    impl = row.get("impl", "triton")
    return impl.strip() if isinstance(impl, str) and impl.strip() else "triton"


def _impls(rows: pd.DataFrame) -> pd.Series:
    return rows.apply(_impl_of, axis=1) if len(rows) else pd.Series([], dtype=object)


def tune_heatmap(rows: pd.DataFrame, subtitle: str = "", interpreter: bool = False,
                 best: pd.Series | None = None, impl: str | None = None) -> Figure:
    """The heatmap figure of one (case_id, kernel) group of tune.csv rows, or of its rows of one
    ``impl`` (then ``best`` is the group's winner, outlined only when it is of that impl)."""
    bm = sorted(rows["block_m"].dropna().unique())
    bn = sorted(rows["block_n"].dropna().unique())
    warps = sorted(rows["num_warps"].dropna().unique())
    stages = sorted(rows["num_stages"].dropna().unique())
    ok = rows[(rows["status"] == "ok") & rows["ms"].notna()]
    norm = _norm(ok["ms"])
    best = winner(rows) if impl is None else best
    outlined = best if impl is None or best is None or _impl_of(best) == impl else None
    cell = 0.62  # inches per heatmap cell, so a value fits in it
    fig = Figure(figsize=(max(8.0, len(stages) * (len(bn) * cell + 1.2) + 1.6),
                          len(warps) * (len(bm) * cell + 1.0) + 2.2), layout="constrained")
    axes = fig.subplots(len(warps), len(stages), squeeze=False)
    image = None
    for (r, w), (c, s) in ((a, b) for a in enumerate(warps) for b in enumerate(stages)):
        ax = axes[r][c]
        sub = rows[(rows["num_warps"] == w) & (rows["num_stages"] == s)]
        grid, notes = _cell_grid(sub, bm, bn)
        image = ax.imshow(grid, cmap=_CMAP, norm=norm, aspect="equal")
        _annotate(ax, grid, notes, norm)
        if outlined is not None and outlined["num_warps"] == w and outlined["num_stages"] == s:
            i, j = bm.index(outlined["block_m"]), bn.index(outlined["block_n"])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red",
                                   linewidth=3, gid="winner"))
        ax.set_xticks(range(len(bn)), [f"{v:g}" for v in bn])
        ax.set_yticks(range(len(bm)), [f"{v:g}" for v in bm])
        ax.set_xlabel("BLOCK_N")
        ax.set_ylabel("BLOCK_M")
        ax.set_title(f"num_warps={w:g}, num_stages={s:g}", fontsize="medium")
    if image is not None and len(ok):
        fig.colorbar(image, ax=axes, label="median time (ms, lower is better)", shrink=0.9)
    first = rows.iloc[0]
    lines = [f"Launch-config tuning: case {first['case_id']}, {first['kernel']} kernel"
             + (f", impl {impl} (its configs only)" if impl is not None else ""),
             _shape_line(first), _best_line(best)]
    lines += [subtitle] if subtitle else []
    lines += [INTERPRETER_NOTE] if interpreter else []
    width = int(fig.get_figwidth() * 11)  # characters that fit across at this font size
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in lines if line), fontsize="medium")
    fig.supxlabel("red outline: the chosen (cached) config; grey: not run, screened out or failed "
                  "(status shown)", fontsize="small")
    return fig


def build_tune_figures(tune: pd.DataFrame, prefix: str = "tune", subtitle: str = "",
                       interpreter: bool = False) -> list[NamedFigure]:
    """One heatmap figure per (case_id, kernel) in `tune` (a tune.csv read by `runs.read_tune`)."""
    figures = []
    groups = sorted(tune.groupby(["case_id", "kernel"]),
                    key=lambda kv: (str(kv[0][0]), KERNEL_ORDER.get(kv[0][1], 9), str(kv[0][1])))
    for (case_id, kernel), rows in groups:
        name, title = f"{prefix}_{slug(case_id)}_{slug(kernel)}", f"Tuning heatmap: {case_id}"
        impls = sorted(rows.groupby(_impls(rows)), key=lambda kv: (kv[0] != "triton", kv[0]))
        if len(impls) == 1:
            fig = tune_heatmap(rows, subtitle=subtitle, interpreter=interpreter)
            figures.append(NamedFigure(name, f"{title} ({kernel})", fig))
            continue
        # One figure per implementation: a triton and a gluon config of the same tile and
        # warps share a cell otherwise, which would show the median of the two.
        best = winner(rows)
        for impl, sub in impls:
            fig = tune_heatmap(sub, subtitle=subtitle, interpreter=interpreter, best=best,
                               impl=impl)
            figures.append(NamedFigure(f"{name}_{slug(impl)}", f"{title} ({kernel}, {impl})",
                                       fig))
    return figures

