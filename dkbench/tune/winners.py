"""Which config wins: per (case, kernel) the fastest right one that is clearly faster than the
default, else the default; per cache key, one config for every case that shares it."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from statistics import geometric_mean

from kernels import CacheKey, LaunchConfig

from ..spec.sweep import Case
from .rows import SCREENED, TuneRow


@dataclass
class KernelResult:
    """The rows of one (case, kernel), the winner marked, and where the winner is cached."""

    case: Case
    kernel: str
    rows: list[TuneRow]
    default: TuneRow
    key: CacheKey

    @property
    def best(self) -> TuneRow | None:
        return next((r for r in self.rows if r.is_best), None)

    def ranked(self) -> list[TuneRow]:
        """The ok rows, the winner first, then fastest first."""
        return sorted((r for r in self.rows if r.status == "ok"),
                      key=lambda r: (not r.is_best, _rank_key(r)))

    @property
    def default_kept(self) -> bool:
        """The default won although another config's median was faster (not clearly faster)."""
        ranked = sorted((r for r in self.rows if r.status == "ok"), key=_rank_key)
        return bool(ranked) and self.default.is_best and ranked[0] is not self.default


@dataclass
class CacheWrite:
    key: CacheKey
    config: LaunchConfig
    ms: float
    default_ms: float


def _rank_key(row: TuneRow) -> tuple[float, float]:
    """Fastest first: by speedup over the default where there is one (paired when timed
    interleaved), then by median ms."""
    speedup = row.speedup_vs_default
    return (-speedup if math.isfinite(speedup) else 0.0, row.ms)


def clearly_faster(row: TuneRow, default: TuneRow) -> bool:
    """Faster than the default beyond the noise: in at least four rounds of five when the two
    were timed interleaved (p20 of the paired speedups above 1) and with a median no slower
    (where the two measures disagree the gain is noise), else with p20-p80 bands apart."""
    if math.isfinite(row.speedup_p20):
        return row.speedup_p20 > 1.0 and row.ms <= default.ms
    return row.ms_p80 < default.ms_p20


def mark_best(rows: list[TuneRow], default: TuneRow) -> None:
    """Flag the winner among the ok rows (only checked rows are ok, and only those timed in full:
    a screened-out row is not): the fastest config that is clearly faster than the default
    (:func:`clearly_faster`), else the default, so noise never moves a cache entry; with the
    default failed, the fastest median. Speedups over the default that timing did not pair are
    the ratio of medians; a screened-out row keeps its screen's."""
    ok = [r for r in rows if r.status == "ok" and math.isfinite(r.ms)]
    for r in rows:
        r.is_best = False
        if r.status not in ("ok", SCREENED) or default.status != "ok":
            r.speedup_vs_default = r.speedup_p20 = r.speedup_p80 = float("nan")
        elif not math.isfinite(r.speedup_vs_default) and r.ms > 0:
            r.speedup_vs_default = default.ms / r.ms
    if not ok:
        return
    if any(r is default for r in ok):
        better = [r for r in ok if r is not default and clearly_faster(r, default)]
        winner = min(better, key=_rank_key) if better else default
    else:
        winner = min(ok, key=lambda r: r.ms)
    winner.is_best = True


def cache_winners(results: list[KernelResult]) -> list[CacheWrite]:
    """One config per cache key: a case's winner, or, when several cases share a key (shapes in
    one bucket), the one of the cases' winners that is ok in all of them with the best
    geometric-mean speedup over the default; failing that, the winner of the largest of those
    cases. Only a case's winner may be chosen: a config that won no case is within the noise
    (or slower) everywhere, and noise must not move a cache entry."""
    by_key: dict[str, list[KernelResult]] = defaultdict(list)
    for result in results:
        if result.best is not None:
            by_key[result.key.as_str()].append(result)
    writes = []
    for group in by_key.values():
        ok = [{r.config: r for r in g.rows if r.status == "ok"} for g in group]
        won = {g.best.config for g in group}
        common = [c for c in ok[0] if c in won and all(c in o for o in ok[1:])]
        if len(group) == 1 or not common or any(g.default.status != "ok" for g in group):
            largest = max(group, key=lambda g: g.case.batch * g.case.seqlen * g.case.heads)
            best = largest.best
            writes.append(CacheWrite(largest.key, best.config, best.ms, largest.default.ms))
            continue
        chosen = max(common, key=lambda c: geometric_mean([o[c].speedup_vs_default
                                                           for o in ok]))
        writes.append(CacheWrite(group[0].key, chosen, geometric_mean([o[chosen].ms for o in ok]),
                                 geometric_mean([g.default.ms for g in group])))
    return writes
