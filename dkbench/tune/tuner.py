"""`dkbench tune`: time launch configs of the bundled kernel per case, keep the fastest right one.

For each case and kernel (fwd; the backward's dk/dv kernel, bwd, and its dq kernel, dq) the
default config and every unpruned config of the space is prepared, checked against the reference,
warmed up and timed as `run` times a case's providers: with ``timing.interleave`` (the default) all
of them together in rounds, the default as the baseline, so each speedup over the default is the
median of per-round ratios; otherwise one after another with ``do_bench``. A config replaces the
default only when it is clearly faster (:func:`clearly_faster`). Every config becomes a row of ``tune.csv``; a failure is a row with its
status, never an exception. The winner per cache key goes to the best-config cache, which the
kernels read at launch.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch

from kernels import BlockLayout, LaunchConfig, sparse_attention
from kernels.attention import CONFIG_ARGUMENTS
from kernels.config_cache import CacheKey, ConfigCache
from kernels.fwd import tile_plan
from kernels.select import block_density, cache_key, clear_memo

from ..measure.check import random_inputs, run_check
from ..measure.envinfo import command_line, environment
from ..measure.providers.base import Prepared, Provider
from ..measure.providers.bundled import BundledKernel
from ..measure.runner import make_step, new_run_dir
from ..measure.timing import Interleaved, Measurement, measure, measure_interleaved
from ..results.schema import check_out_dir, read_meta, write_meta
from ..spec.sweep import Case, Sweep
from .cache import cache_errors
from .space import Candidates, TuneJob

TUNE_FILE = "tune.csv"

@dataclass
class TuneRow:
    """One measured (or pruned, or failed) config. Field order is tune.csv's column order."""

    run_id: str
    case_id: str
    kernel: str
    dtype: str
    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    pattern: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    impl: str = "triton"
    ms: float = float("nan")
    ms_p20: float = float("nan")
    ms_p80: float = float("nan")
    status: str = "ok"
    message: str = ""
    is_best: bool = False
    speedup_vs_default: float = float("nan")
    # The p20/p80 of the per-round speedups when timed interleaved with the default, else NaN.
    speedup_p20: float = float("nan")
    speedup_p80: float = float("nan")

    @property
    def config(self) -> LaunchConfig:
        return LaunchConfig(self.block_m, self.block_n, self.num_warps, self.num_stages,
                            self.impl)


TUNE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(TuneRow))


def append_tune_rows(path: Path, rows: list[TuneRow]) -> None:
    """Append rows to tune.csv (header first when new), flushed: a crash keeps finished groups."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TUNE_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(dataclasses.asdict(row))
        fh.flush()
        os.fsync(fh.fileno())


# -- measuring one config --------------------------------------------------------------------------


class _BackwardCandidate(Provider):
    """The bundled kernel with one backward kernel's config ("bwd": dk/dv, or "dq") pinned; the
    other kernels' configs are the winners tuned before it, else looked up."""

    name = "dkbench"
    computes = "pattern"

    def __init__(self, kernel: str, winners: dict[str, LaunchConfig]) -> None:
        self.kernel = kernel
        self.winners = winners

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        layout = layout.to(device)
        pinned = {**self.winners, self.kernel: config}
        configs = {arg: pinned.get(kernel) for kernel, arg in CONFIG_ARGUMENTS.items()}
        if pinned.get("fwd") is not None:
            tile_plan(layout, pinned["fwd"].block_m, case.seqlen)

        def attn(q, k, v):
            return sparse_attention(q, k, v, layout, sm_scale=scale, seq_dim=2, **configs)

        return Prepared(attn, config.short(), "explicit", launch_config=config)


@dataclass
class ReadyCandidate:
    """A config prepared, checked and warmed up: its row and the step to time."""

    row: TuneRow
    step: Callable[[], object]

    @property
    def name(self) -> str:
        return self.row.config.short()


def _failure(exc: BaseException) -> tuple[str, str]:
    from triton.runtime.errors import OutOfResources

    text = str(exc).strip()
    first = (text.splitlines()[0] if text else type(exc).__name__)[:500]
    oom = isinstance(exc, (torch.cuda.OutOfMemoryError, OutOfResources))
    if oom or "out of memory" in text.lower():
        return "oom", f"{type(exc).__name__}: {first}"
    return "error", f"{type(exc).__name__}: {first}"


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepare_candidate(provider: Provider, config: LaunchConfig, case: Case, layout: BlockLayout,
                      sweep: Sweep, device: torch.device, inputs, seed: int,
                      row: TuneRow) -> ReadyCandidate | None:
    """Prepare, check and warm up one config (compilation stays outside the timed region); None
    when it failed, the failure in ``row.status``/``row.message``."""
    scale = case.sm_scale if case.sm_scale is not None else 1.0 / math.sqrt(case.head_dim)
    try:
        prepared = provider.prepare(case, layout, sweep, device, scale, config)
        checked = run_check(provider, prepared, case, layout, sweep, device, scale, seed)
        if not checked.ok:
            row.status = "wrong"
            row.message = (f"{checked.what}: relative error {checked.rel_err:.3g} above "
                           f"{sweep.check.rtol.get(case.dtype, 1e-2)}")
            return None
        step = make_step(case.mode, prepared.attn, *inputs)
        step()
        return ReadyCandidate(row, step)
    except Exception as exc:  # noqa: BLE001 - one failing config never stops a tune
        row.status, row.message = _failure(exc)
        _release(device)
        return None


def time_alone(ready: ReadyCandidate, sweep: Sweep, device: torch.device) -> Measurement:
    """One candidate on its own, as `run` times with ``timing.interleave: false``."""
    return measure(ready.step, sweep.timing, device)


def time_together(ready: list[ReadyCandidate], baseline: str | None, sweep: Sweep,
                  device: torch.device) -> Interleaved:
    """All candidates of one (case, kernel) in rounds, as `run` times a case's providers."""
    return measure_interleaved({r.name: r.step for r in ready}, sweep.timing, device, baseline)


def measure_candidate(provider: Provider, config: LaunchConfig, case: Case, layout: BlockLayout,
                      sweep: Sweep, device: torch.device, inputs, seed: int,
                      row: TuneRow) -> TuneRow:
    """Prepare, check and time one config on its own; every failure lands in the row."""
    ready = prepare_candidate(provider, config, case, layout, sweep, device, inputs, seed, row)
    if ready is None:
        return row
    try:
        timed = time_alone(ready, sweep, device)
        row.ms, row.ms_p20, row.ms_p80 = timed.ms, timed.p20, timed.p80
    except Exception as exc:  # noqa: BLE001 - one failing config never stops a tune
        row.status, row.message = _failure(exc)
    finally:
        del ready
        _release(device)
    return row


def measure_together(ready: list[ReadyCandidate], default: LaunchConfig, sweep: Sweep,
                     device: torch.device) -> None:
    """Time the ready candidates interleaved and fill their rows; each speedup over the default
    is the median of the per-round ratios (a drift between rounds leaves it alone)."""
    names = {r.name for r in ready}
    baseline = default.short() if default.short() in names else None
    try:
        timed = time_together(ready, baseline, sweep, device)
    except Exception as exc:  # noqa: BLE001 - e.g. no memory for the L2 flush buffer
        for r in ready:
            r.row.status, r.row.message = _failure(exc)
        return
    for r in ready:
        if r.name in timed.errors:
            r.row.status, r.row.message = _failure(timed.errors[r.name])
            continue
        got = timed.times[r.name]
        r.row.ms, r.row.ms_p20, r.row.ms_p80 = got.ms, got.p20, got.p80
        if r.name == baseline:
            r.row.speedup_vs_default = r.row.speedup_p20 = r.row.speedup_p80 = 1.0
        elif r.name in timed.ratios:
            ratio = timed.ratios[r.name]
            r.row.speedup_vs_default = ratio.median
            r.row.speedup_p20, r.row.speedup_p80 = ratio.p20, ratio.p80


# -- tuning ----------------------------------------------------------------------------------------


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


@dataclass
class TuneOutcome:
    run_dir: Path
    results: list[KernelResult]
    cache_path: Path
    writes: list[CacheWrite]


def _row(run_id: str, case: Case, kernel: str, config: LaunchConfig) -> TuneRow:
    return TuneRow(run_id=run_id, case_id=case.case_id, kernel=kernel, dtype=case.dtype,
                   seqlen=case.seqlen, heads=case.heads, kv_heads=case.kv_heads,
                   head_dim=case.head_dim, block_size=case.block_size,
                   pattern=case.pattern.label(), block_m=config.block_m, block_n=config.block_n,
                   num_warps=config.num_warps, num_stages=config.num_stages, impl=config.impl)


def _rank_key(row: TuneRow) -> tuple[float, float]:
    """Fastest first: by speedup over the default where there is one (paired when timed
    interleaved), then by median ms."""
    speedup = row.speedup_vs_default
    return (-speedup if math.isfinite(speedup) else 0.0, row.ms)


def clearly_faster(row: TuneRow, default: TuneRow) -> bool:
    """Faster than the default beyond the noise: in at least four rounds of five when the two
    were timed interleaved (p20 of the paired speedups above 1), else with p20-p80 bands apart."""
    if math.isfinite(row.speedup_p20):
        return row.speedup_p20 > 1.0
    return row.ms_p80 < default.ms_p20


def mark_best(rows: list[TuneRow], default: TuneRow) -> None:
    """Flag the winner among the ok rows (only checked rows are ok): the fastest config that is
    clearly faster than the default (:func:`clearly_faster`), else the default, so noise never
    moves a cache entry; with the default failed, the fastest median. Speedups over the default
    that timing did not pair are the ratio of medians."""
    ok = [r for r in rows if r.status == "ok" and math.isfinite(r.ms)]
    for r in rows:
        r.is_best = False
        if r.status != "ok" or default.status != "ok":
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


def tune_kernel(job: TuneJob, cands: Candidates, sweep: Sweep, device: torch.device, run_id: str,
                winners: dict[str, LaunchConfig],
                on_config: Callable[[str], None]) -> KernelResult:
    """Measure every candidate of one kernel of one case, behind the ``winners`` of the kernels
    tuned before it; pruned configs become rows too."""
    kernel = cands.kernel
    # What is checked and timed: the forward, or the whole backward (both of its kernels).
    case = dataclasses.replace(job.case, mode="fwd" if kernel == "fwd" else "bwd")
    provider = BundledKernel() if kernel == "fwd" else _BackwardCandidate(kernel, winners)
    seed = (sweep.seed * 1_000_003 + int(job.case.case_id, 16)) % 2**31
    inputs = random_inputs(case, device, kernel != "fwd", seed)
    rows, ready = [], []
    for config in cands.run:
        on_config(f"{kernel} {config.short()}: {job.case.label()}")
        row = _row(run_id, job.case, kernel, config)
        rows.append(row)
        if not sweep.timing.interleave:
            measure_candidate(provider, config, case, job.layout, sweep, device, inputs, seed + 1,
                              row)
            continue
        candidate = prepare_candidate(provider, config, case, job.layout, sweep, device, inputs,
                                      seed + 1, row)
        if candidate is not None:
            ready.append(candidate)
    if sweep.timing.interleave:
        on_config(f"{kernel}: timing {len(ready)} configs interleaved: {job.case.label()}")
        if ready:
            measure_together(ready, cands.default, sweep, device)
        ready.clear()
        _release(device)
    if rows[0].status == "ok":  # cands.run starts with the default
        rows[0].message = "default config (reference)"
    for config, reason in cands.pruned:
        row = _row(run_id, job.case, kernel, config)
        row.status, row.message = "unsupported", f"pruned: {reason}"
        rows.append(row)
    default = rows[0]
    mark_best(rows, default)
    density = block_density(job.layout, job.case.seqlen)
    key = cache_key(kernel, device, getattr(torch, case.dtype), case.head_dim, case.block_size,
                    case.seqlen, density)
    return KernelResult(job.case, kernel, rows, default, key)


def cache_winners(results: list[KernelResult]) -> list[CacheWrite]:
    """One config per cache key: a case's winner, or, when several cases share a key (shapes in
    one bucket), the config ok in all of them with the best geometric-mean speedup over the
    default; failing that, the winner of the largest of those cases."""
    by_key: dict[str, list[KernelResult]] = defaultdict(list)
    for result in results:
        if result.best is not None:
            by_key[result.key.as_str()].append(result)
    writes = []
    for group in by_key.values():
        ok = [{r.config: r for r in g.rows if r.status == "ok"} for g in group]
        common = [c for c in ok[0] if all(c in o for o in ok[1:])]
        if len(group) == 1 or not common or any(g.default.status != "ok" for g in group):
            largest = max(group, key=lambda g: g.case.batch * g.case.seqlen * g.case.heads)
            best = largest.best
            writes.append(CacheWrite(largest.key, best.config, best.ms, largest.default.ms))
            continue
        chosen = max(common, key=lambda c: statistics.geometric_mean([o[c].speedup_vs_default for o in ok]))
        writes.append(CacheWrite(group[0].key, chosen, statistics.geometric_mean([o[chosen].ms for o in ok]),
                                 statistics.geometric_mean([g.default.ms for g in group])))
    return writes


def preflight(out: Path, cache_path: Path | None) -> ConfigCache:
    """Before anything is timed: ``out`` can take the tune directory and the cache can be written
    (a bad cache file is set aside now, with its warning, not after the last candidate)."""
    check_out_dir(out)
    cache = ConfigCache(cache_path)
    with cache_errors():
        cache.check_writable()
    return cache


def execute_tune(sweep: Sweep, spec_text: str, jobs: list[TuneJob], device: torch.device,
                 out: Path, cache_path: Path | None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> TuneOutcome:
    """Tune every job into a new ``<out>/tune-<name>-<stamp>/`` and write the winners' cache.
    Raises BadInputError / CacheError before timing when ``out`` or the cache is not writable."""
    cache = preflight(out, cache_path)
    run_dir = new_run_dir(out, f"tune-{sweep.name}")
    env = environment(device)
    mode = jobs[0].case.mode if jobs else "fwd"
    write_meta(run_dir, {
        "run_id": run_dir.name, "kind": "tune", "spec_name": sweep.name, "name": sweep.name,
        "description": sweep.description, "command": command_line(), "mode": mode,
        "providers": ["dkbench"], "environment": env, "spec": sweep.model_dump(mode="json"),
        "spec_text": spec_text, "cache": str(cache.path),
        "spaces": {f"{j.case.case_id}/{c.kernel}": [x.short() for x in c.run] for j in jobs
                   for c in j.candidates},
        "started": datetime.now(timezone.utc).isoformat()})
    # One step per config, and with interleaved timing one more per (case, kernel): the timing.
    together = 1 if sweep.timing.interleave else 0
    total = sum(len(c.run) + together for j in jobs for c in j.candidates)
    done = 0

    def on_config(text: str) -> None:
        nonlocal done
        if on_progress:
            on_progress(text, done, total)
        done += 1

    results: list[KernelResult] = []
    for job in jobs:
        winners: dict[str, LaunchConfig] = {}  # each kernel is tuned behind those before it
        for cands in job.candidates:
            result = tune_kernel(job, cands, sweep, device, run_dir.name, winners, on_config)
            append_tune_rows(run_dir / TUNE_FILE, result.rows)
            results.append(result)
            if result.best is not None:
                winners[cands.kernel] = result.best.config
    if on_progress:
        on_progress("done", total, total)
    writes = cache_winners(results)
    with cache_errors():
        for w in writes:
            cache.put(w.key, w.config.as_dict(), ms=w.ms, default_ms=w.default_ms)
    clear_memo()
    write_meta(run_dir, {**read_meta(run_dir), "finished": datetime.now(timezone.utc).isoformat(),
                         "cache_writes": [w.key.as_str() for w in writes]})
    return TuneOutcome(run_dir, results, cache.path, writes)
