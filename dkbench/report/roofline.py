"""The roofline of a run: each ok row's achieved TFLOP/s against its arithmetic intensity (its
FLOPs over the bytes its work moves, `row_bytes`: the model of `dkbench.measure.sol`), under the
ceilings this GPU was measured at (`dkbench env --calibrate`, recorded in meta.json's
`speed_of_light`): the copy bandwidth as a slope, each dtype's matrix rate as a flat line.

A run without a calibration (the interpreter, a failed calibration, a meta.json older than it) or
a results.csv older than the `row_bytes` column has no roofline; `skip_reason` says which.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..results.runs import Run
from ..spec.sweep import DTYPES
from .figure import colors

_MODE_MARKERS = {"fwd": "o", "bwd": "s", "fwd_bwd": "^", "prefill_varlen": "D", "decode": "v"}


def _mode_order(mode: str) -> tuple[int, str]:
    modes = list(_MODE_MARKERS)  # pipeline order: fwd before bwd
    return (modes.index(mode) if mode in modes else len(modes), mode)


def calibration(run: Run) -> dict | None:
    """meta.json's speed of light when it holds a calibration (rates and bandwidth), else None."""
    sol = run.meta.get("speed_of_light")
    if isinstance(sol, dict) and isinstance(sol.get("matmul_tflops"), dict) and sol.get("copy_gbs"):
        return sol
    return None


def points(run: Run) -> pd.DataFrame:
    """The ok rows with positive FLOPs, bytes and TFLOP/s, with their `intensity` (FLOP/byte)."""
    df = run.results
    if "row_bytes" not in df.columns:
        return df.iloc[0:0].assign(intensity=[])
    num = {c: pd.to_numeric(df[c], errors="coerce") for c in ("flops", "row_bytes", "tflops")}
    keep = (df["status"] == "ok") & (num["flops"] > 0) & (num["row_bytes"] > 0) & (num["tflops"] > 0)
    return df[keep].assign(intensity=num["flops"][keep] / num["row_bytes"][keep],
                           tflops=num["tflops"][keep])


def skip_reason(run: Run) -> str | None:
    """Why ``run`` has no roofline, or None when it has one."""
    sol = run.meta.get("speed_of_light")
    if run.interpreter:
        return "interpreter timings: no speed of light to draw against"
    if calibration(run) is None:
        why = sol.get("unavailable") if isinstance(sol, dict) else None
        return (f"no calibration in meta.json ({why})" if why else
                "meta.json records no speed of light (run before `dkbench env --calibrate` "
                "existed)")
    if "row_bytes" not in run.results.columns:
        return "results.csv has no row_bytes column (written before it existed)"
    if points(run).empty:
        return "no ok row with FLOPs, bytes and TFLOP/s"
    return None


def _ceilings(ax, cal: dict, dtypes: list[str], lo: float, hi: float) -> None:
    """The bandwidth slope over [lo, hi] FLOP/byte and a flat line per dtype from its ridge on."""
    per_intensity = cal["copy_gbs"] / 1e3  # TFLOP/s per FLOP/byte at the copy bandwidth
    rates = {d: r for d, r in cal["matmul_tflops"].items() if d in dtypes}
    top = max(rates.values(), default=per_intensity * hi)
    xs = np.geomspace(lo, min(hi, top / per_intensity), 2)
    ax.plot(xs, xs * per_intensity, color="black", linewidth=1.5, gid="ceiling",
            label=f"copy bandwidth {cal['copy_gbs']:.0f} GB/s")
    for (dtype, rate), style in zip(sorted(rates.items()), ("-", "--", ":", "-.")):
        ax.plot([rate / per_intensity, hi], [rate, rate], color="0.35", linestyle=style,
                linewidth=1.5, gid="ceiling", label=f"{dtype} matrix rate {rate:.0f} TFLOP/s")


def build_roofline(run: Run) -> Figure:
    """The roofline figure of one run that has one (`skip_reason` is None)."""
    cal, rows = calibration(run), points(run)
    ridges = [r / (cal["copy_gbs"] / 1e3) for r in cal["matmul_tflops"].values()]
    lo = min(rows["intensity"].min(), *ridges) / 4
    hi = max(rows["intensity"].max(), *ridges) * 4
    fig = Figure(figsize=(8.5, 6.2), layout="constrained")
    ax = fig.subplots()
    _ceilings(ax, cal, sorted({DTYPES.get(d, d) for d in rows["dtype"]}), lo, hi)
    providers = sorted(rows["provider"].unique())
    palette = colors(len(providers))  # one colour per provider, none repeated
    for i, provider in enumerate(providers):
        for mode, g in rows[rows["provider"] == provider].groupby("mode"):
            ax.plot(g["intensity"], g["tflops"], linestyle="none", gid="row",
                    marker=_MODE_MARKERS.get(mode, "x"), color=palette[i],
                    markersize=7, alpha=0.85, label=f"{provider} · {mode}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    # Plain numbers (600, not 6x10^2) at 1, 2 and 5 per decade: the rows' TFLOP/s often span
    # less than a decade (100 to 700), where powers of ten alone would leave the axis unlabelled.
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("achieved TFLOP/s (computed pairs)")
    ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], linestyle="none", marker="o", color=palette[i],
                      label=p) for i, p in enumerate(providers)]
    handles += [Line2D([], [], linestyle="none", marker=_MODE_MARKERS.get(m, "x"), color="0.3",
                       label=m) for m in sorted(set(rows["mode"]), key=_mode_order)]
    handles += [line for line in ax.get_lines() if line.get_gid() == "ceiling"]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)),
               fontsize="small")
    fig.suptitle("Roofline: every ok row against this GPU's measured ceilings\n"
                 + textwrap.fill(f"{run.label} · {cal.get('gpu', '')}", 90))
    return fig
