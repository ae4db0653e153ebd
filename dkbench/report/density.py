"""A density sweep read from results: per shape, the bundled kernel's time at each density beside
the fastest dense provider's, and their break-even (`dkbench.report.breakeven`).

A shape (mode, dtype, seqlen and the other case columns but the pattern) is part of a density sweep
when the bundled kernel ran ok at two densities or more there (random patterns at several
densities, say). A dense provider computes the same problem at every density, so its time there is
the median of its ok rows over all of them; the fastest such provider is the one to beat. Which
providers are dense is read from the rows themselves: a dense provider is credited every pair, so
its TFLOP/s on computed pairs equals its dense-equivalent TFLOP/s at every density below 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..names import BUNDLED_PROVIDER
from .breakeven import BreakEven, break_even, median_points

SHAPE_COLUMNS = ("mode", "dtype", "seqlen", "batch", "q_len", "heads", "kv_heads", "head_dim",
                 "causal", "block_size")


@dataclass(frozen=True)
class DensityFacet:
    """One shape of a density sweep: ``key`` holds its SHAPE_COLUMNS (those the CSV has)."""

    run: str
    key: dict[str, object]
    ours: list[tuple[float, float]]  # (density, median ms), by density
    dense_provider: str | None  # the fastest dense provider with an ok row, if any
    dense_ms: float | None

    @property
    def result(self) -> BreakEven | None:
        """The break-even against the fastest dense provider; None without one."""
        if self.dense_ms is None:
            return None
        return break_even(self.ours, self.dense_ms)


def _ok(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[(rows["status"] == "ok") & rows["ms"].notna() & (rows["ms"] > 0)]


def dense_providers(frame: pd.DataFrame) -> set[str]:
    """Providers whose every ok row below density 1 has equal computed and dense-equivalent
    TFLOP/s (and that have such a row)."""
    ok = _ok(frame)
    ok = ok[(ok["density"] < 1) & ok["tflops"].notna() & ok["dense_tflops"].notna()]
    same = (ok["tflops"] - ok["dense_tflops"]).abs() <= 1e-6 * ok["dense_tflops"].abs()
    return {str(p) for p, flags in same.groupby(ok["provider"]) if bool(flags.all())}


def density_facets(frame: pd.DataFrame) -> list[DensityFacet]:
    """The density sweep's shapes in ``frame`` (results of one or more runs, with the `run`
    column `dkbench.results.runs.load_runs` adds); [] when it has none."""
    if frame.empty:
        return []
    frame = frame if "run" in frame.columns else frame.assign(run="")
    keys = [c for c in SHAPE_COLUMNS if c in frame.columns]
    dense = dense_providers(frame) - {BUNDLED_PROVIDER}
    facets = []
    for values, rows in frame.groupby(["run", *keys], sort=True, dropna=False):
        ok = _ok(rows.dropna(subset=["density"]))
        ours = median_points(zip(ok.loc[ok["provider"] == BUNDLED_PROVIDER, "density"],
                                 ok.loc[ok["provider"] == BUNDLED_PROVIDER, "ms"]))
        if len(ours) < 2:
            continue
        times = ok[ok["provider"].isin(dense)].groupby("provider")["ms"].median()
        fastest = times.idxmin() if len(times) else None
        facets.append(DensityFacet(
            str(values[0]), dict(zip(keys, values[1:])), ours,
            None if fastest is None else str(fastest),
            None if fastest is None or not math.isfinite(times[fastest]) else float(times[fastest])))
    return facets
