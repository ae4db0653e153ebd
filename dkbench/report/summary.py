"""The end-of-run summary: per case, each provider's time and speedup, the winner marked."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from rich.markup import escape
from rich.table import Table

from ..results.schema import ResultRow
from ..startup import STARTUP
from .digits import distinct_digits


def _decimals(values: list[float], start: int, least_digits: int) -> int:
    """Decimals from ``start`` on, enough that each of ``values`` shows ``least_digits``
    significant digits and that two different values never read the same (the star on one of
    two times that both print 0.012 says nothing)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    first = max([start, *(least_digits - 1 - math.floor(math.log10(v)) for v in finite)])
    return distinct_digits(finite, lambda v, d: f"{v:.{d}f}", first, stop=max(first, 12))


def _density(density: float) -> str:
    return f"{density:.3f}" if not density == density or density >= 0.01 else f"{density:.2g}"


def summary_table(rows: list[ResultRow], baseline: str | None) -> Table:
    """Per case a line, per provider a column: its median ms (and speedup), the fastest starred.
    Names and labels are text, never rich markup (a pattern file named "[bold]x.npy")."""
    providers = list(dict.fromkeys(r.provider for r in rows))
    by_case: dict[str, dict[str, ResultRow]] = defaultdict(dict)
    labels: dict[str, str] = {}
    for r in rows:
        by_case[r.case_id][r.provider] = r
        q = f"q{r.q_len}/" if r.q_len != r.seqlen else ""
        labels[r.case_id] = (f"{r.mode} {r.dtype} b{r.batch} {q}s{r.seqlen} h{r.heads}/{r.kv_heads} "
                             f"d{r.head_dim} {r.pattern} (density {_density(r.density)})")
    title = "ms (speedup vs " + (baseline or "no baseline") + "); * = fastest"
    table = Table(title=escape(title), show_lines=False)
    table.add_column("case", overflow="fold", max_width=60)
    for p in providers:
        table.add_column(escape(p), justify="right")
    for case_id, cells in by_case.items():
        ok = {p: r for p, r in cells.items() if r.status == "ok" and math.isfinite(r.ms)}
        fastest = min((r.ms for r in ok.values()), default=None)
        ms_places = _decimals([r.ms for r in ok.values()], 3, 2)
        x_places = _decimals([r.speedup for p, r in ok.items()
                              if p not in (baseline, r.baseline)], 2, 2)
        row = [escape(labels[case_id])]
        for p in providers:
            r = cells.get(p)
            if r is None:
                row.append("")
            elif r.status != "ok":
                row.append(f"[dim]{escape(r.status)}[/dim]")
            else:
                text = f"{r.ms:.{ms_places}f}"
                # No ratio on a baseline's own rows (its graph rows are their own baseline).
                if r.speedup == r.speedup and p not in (baseline, r.baseline):
                    text += f" ({r.speedup:.{x_places}f}x)"
                # Every provider at the fastest time is starred: a tie has no single winner.
                row.append(f"[bold green]*{text}[/bold green]" if p in ok and r.ms == fastest
                           else text)
        table.add_row(*row)
    return table


def cannot_run_here(rows: list[ResultRow], device: torch.device) -> set[str]:
    """Providers of these rows that are unavailable on this device at all (e.g. a CUDA backend on
    a CPU): their `unsupported` rows are expected here, not failures."""
    from ..measure.providers import PROVIDERS

    names = {r.provider for r in rows if r.status == "unsupported" and r.provider in PROVIDERS}
    return {n for n in names if PROVIDERS[n]().unavailable(device) is not None}


def outcome_line(rows: list[ResultRow], cannot_run: set[str]) -> str | None:
    """The run's last word on its rows: how many did not run ok, apart from those skipped because
    their provider cannot run on this device; None when every row ran ok."""
    skipped = [r for r in rows if r.status == "unsupported" and r.provider in cannot_run]
    ran = len(rows) - len(skipped)
    failed = sum(r.status != "ok" for r in rows) - len(skipped)
    parts = []
    if failed:
        parts.append(f"{failed} of {ran} rows did not run ok (see status/message in results.csv)")
    elif skipped and ran:
        parts.append(f"{ran} of {ran} rows ran ok")
    if skipped:
        names = ", ".join(sorted({r.provider for r in skipped}))
        parts.append(f"{len(skipped)} skipped (cannot run here: {names})")
    return "; ".join(parts) + "." if parts else None


def setup_line(rows: list[ResultRow], wall_s: float, slowest: int = 3,
               ahead: dict | None = None, startup_s: float | None = None) -> str | None:
    """Where the run's wall time went: the command's start-up (``startup_s``, its seconds
    before the run began, counted in the wall time, when known), compiling ahead (``ahead``,
    meta.json's ``compiled_ahead``, when that phase ran), the rows' set-up (prepare, check,
    warm-up: where providers compile) and the rest (timing, building cases), with the providers
    whose set-up took longest. None when no row got as far as its set-up."""
    per_provider: dict[str, float] = defaultdict(float)
    for row in rows:
        if row.setup_ms == row.setup_ms:  # not NaN
            per_provider[row.provider] += row.setup_ms / 1e3
    if not per_provider:
        return None
    total = sum(per_provider.values())
    top = sorted(per_provider.items(), key=lambda item: item[1], reverse=True)[:slowest]
    names = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in top)
    first, ahead_s = "", 0.0
    if startup_s is not None:
        first = f"{STARTUP} {startup_s:.0f} s, "
    if ahead:
        ahead_s, workers = ahead["seconds"], ahead["workers"]
        first += f"compiling ahead {ahead_s:.0f} s ({workers} worker{'s' * (workers != 1)}), "
    rest = max(wall_s - total - ahead_s, 0.0)
    return (f"Wall time {wall_s + (startup_s or 0.0):.0f} s: {first}set-up (prepare, check, warm-up) {total:.0f} s, "
            f"most in {names}; timing and the rest {rest:.0f} s.")
