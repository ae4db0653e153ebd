"""The CI regression gate: compare a fresh results CSV against a baseline CSV, row by row.

Rows are matched on `KEY_COLUMNS`. Only rows with status ``ok`` on both sides are compared on a
metric; a row ok in the baseline but failed in the current run (oom, error, wrong, unsupported) is a
regression of its own. Rows present on one side only are listed, and fail the gate only when asked.

Metrics and direction:
    speedup  against-provider ms / row ms, measured in the same run (higher is better). The default,
             because a slower machine slows both providers and leaves the ratio alone. The recorded
             `speedup` column is used when the row's `baseline` column names the against-provider;
             otherwise the ratio is recomputed from that provider's row of the same case and run.
             The against-provider's own rows are not gated on this metric (their ratio is 1).
    tflops   higher is better.
    ms       lower is better.
``change`` is always current / baseline - 1 in the metric's own units; the *worsening* is
-change for higher-is-better metrics and +change for ms.

Noise model: each row carries the median `ms` and its 20th/80th percentiles. Its relative noise
band is the half-width of that interval, (ms_p80 - ms_p20) / (2 * ms); TFLOP/s share it, being
proportional to 1/ms. A speedup whose row records `speedup_p20`/`speedup_p80` (its providers were
timed interleaved, and the speedup is the median of per-round ratios) has that ratio's own band,
(speedup_p80 - speedup_p20) / (2 * speedup): the drift both providers saw in the same rounds
cancels in it. Otherwise (files written before that, or a ratio recomputed against another
provider) a speedup is a ratio of two timings, so its band is the sum of the row's band and its
against-provider row's band (relative errors of a quotient add, to first order). Rows with no
recorded spread have a band of 0. A row regresses only when its worsening exceeds
``max(tolerance, band(current) + band(baseline))``: the drop must be larger than the tolerance *and*
large enough that the two p20-p80 intervals no longer overlap. An improvement beyond the same
threshold is reported as such and never fails.

Throttled rows: a row whose median SM clock (the `clock_mhz_median` column, read through NVML while
it was timed) fell more than 10% below the median of its table's rows on the same GPU
(`dkbench.measure.telemetry.throttle_notes`) measured a slowed GPU, not its kernel. Such a row, on
either side, is skipped (`throttled`) and never fails the gate; rerun it. Files without the column
have no throttled rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from ..errors import BadInputError, one_line
from ..measure.telemetry import THROTTLE_FRACTION, throttle_notes
from ..results.check import check_values
from ..results.schema import KEY_COLUMNS, RESULTS_FILE, held_runs, read_results
from ..spec.sweep import GRAPH_SUFFIX, graph_row_name, row_provider

# metric name -> True when higher is better
METRICS: dict[str, bool] = {"speedup": True, "tflops": True, "ms": False}

PASS, IMPROVED, REGRESSION, FAILED, SKIPPED = "pass", "improved", "regression", "failed", "skipped"

_PROVIDER_AT = KEY_COLUMNS.index("provider")
_TIMING_COLUMNS = ("status", "ms", "ms_p20", "ms_p80")

Key = tuple[str, ...]


@dataclass(frozen=True)
class Comparison:
    """One case x provider present on both sides. Values are in the metric's units; change, noise
    and threshold are fractions (0.05 is 5%)."""

    case: str
    provider: str
    baseline: float
    current: float
    change: float
    noise: float
    threshold: float
    verdict: str
    note: str = ""
    throttled: bool = False  # skipped because a side's GPU was throttled while the row ran


@dataclass(frozen=True)
class OneSided:
    """A case x provider found in one table only; `side` is "baseline" or "current"."""

    case: str
    provider: str
    side: str
    status: str


@dataclass(frozen=True)
class GateResult:
    """Everything the gate decided; the CLI renders it and maps `passed` to an exit code."""

    metric: str
    against: str | None
    tolerance: float
    comparisons: list[Comparison]
    one_sided: list[OneSided]
    fail_on_missing: bool = False
    notes: list[str] = field(default_factory=list)
    against_rows: int = 0  # shared rows of the against-provider itself, not gated on speedup

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.verdict in (REGRESSION, FAILED)]

    @property
    def compared(self) -> int:
        """Rows whose metric was compared on both sides (not skipped, not failed)."""
        return sum(c.verdict in (PASS, IMPROVED, REGRESSION) for c in self.comparisons)

    @property
    def failed(self) -> bool:
        return bool(self.regressions) or (self.fail_on_missing and bool(self.one_sided))

    @property
    def nothing_compared(self) -> bool:
        """No row was compared and none failed: the gate has measured nothing it could pass."""
        return not self.compared and not self.failed

    @property
    def passed(self) -> bool:
        return not self.failed and not self.nothing_compared

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "NO VERDICT" if self.nothing_compared else "FAIL"

    def nothing_reason(self) -> str:
        """Why no row was compared, for the error line of a gate that is not a pass."""
        what = self.metric + (f" vs {self.against}" if self.metric == "speedup" else "")
        skipped = [c for c in self.comparisons if c.verdict == SKIPPED]
        throttled = sum(c.throttled for c in skipped)
        parts = []
        if skipped:
            detail = f" ({throttled} throttled: rerun them on a steady GPU)" if throttled else ""
            parts.append(f"{_rows(len(skipped))} skipped{detail}, e.g. {skipped[0].provider} "
                         f"{skipped[0].case}: {skipped[0].note}")
        if self.against_rows:
            parts.append(f"{_rows(self.against_rows)} of {self.against} itself, which the "
                         "speedup metric does not gate (pick another with --against, or "
                         "--metric ms|tflops)")
        if self.one_sided:
            parts.append(f"{_rows(len(self.one_sided))} on one side only")
        return (f"no row was compared on {what}, so the gate cannot pass: "
                + "; ".join(parts or ["no rows"]))

    def summary(self) -> str:
        """The one-line verdict."""
        parts = [f"{self.compared} compared"]
        for verdict, noun in ((REGRESSION, "regressed"), (FAILED, "failed"),
                              (IMPROVED, "improved"), (SKIPPED, "skipped")):
            n = sum(c.verdict == verdict for c in self.comparisons)
            if n:
                parts.append(f"{n} {noun}")
        if self.one_sided:
            tail = " (--fail-on-missing)" if self.fail_on_missing else ""
            parts.append(f"{len(self.one_sided)} on one side only{tail}")
        what = self.metric + (f" vs {self.against}" if self.metric == "speedup" else "")
        return (f"{self.verdict}: {', '.join(parts)} ({what}, tolerance "
                f"{self.tolerance * 100:.3g}%)")


def _rows(n: int) -> str:
    return f"{n} row{'s' * (n != 1)}"


def parse_tolerance(text: str) -> float:
    """A tolerance in percent, "5%" or "5" (both 5 percent), as a fraction (0.05)."""
    body = text.strip()
    body = body[:-1].strip() if body.endswith("%") else body
    try:
        if "_" in body:  # float() reads "5_0" (a slip for 5.0) as 50
            raise ValueError(body)
        value = float(body)
    except ValueError:
        raise BadInputError(
            f"--tolerance {text!r}: expected a percentage such as 5% or 5") from None
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise BadInputError(f"--tolerance {text!r}: must be a percentage between 0 and 100")
    return value / 100


def _key_text(value: Any) -> str:
    # CSVs written by different runs may read back 64 as int in one and 64.0 in the other.
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value).strip()


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class _Table:
    label: str  # "current" or "baseline"
    path: Path
    rows: dict[Key, dict[str, Any]]
    throttled: dict[Key, str] = field(default_factory=dict)  # key -> its throttle note


def load_table(path: Path, label: str, required: Sequence[str]) -> _Table:
    """Read a run directory or CSV, check its columns, and index its rows by case key."""
    path = Path(path)
    csv_path = results_csv(path)
    if not csv_path.is_file():
        raise BadInputError(f"{label} {path}: {_not_a_run(path)}")
    try:
        frame = read_results(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise BadInputError(f"{label} {csv_path}: not a readable results CSV ({one_line(err)})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BadInputError(f"{label} {csv_path}: missing columns {', '.join(missing)}")
    if frame.empty:
        raise BadInputError(f"{label} {csv_path}: no rows")
    check_values(frame, csv_path, label)
    rows: dict[Key, dict[str, Any]] = {}
    for record in frame.to_dict("records"):
        key = tuple(_key_text(record[c]) for c in KEY_COLUMNS)
        if key in rows:
            raise BadInputError(f"{label} {csv_path}: two rows for the same case "
                                f"({case_label(key)}, provider {key[_PROVIDER_AT]}); "
                                "gate one run at a time")
        record["status"] = _key_text(record["status"]).lower()
        rows[key] = record
    notes = throttle_notes(list(rows.values()))
    throttled = {key: note for key, note in zip(rows, notes) if note is not None}
    return _Table(label, csv_path, rows, throttled)


def results_csv(path: Path) -> Path:
    """The results CSV the gate reads for ``path``: a run directory's results.csv, or the file."""
    path = Path(path)
    return path / RESULTS_FILE if path.is_dir() else path


def _not_a_run(path: Path) -> str:
    """Why ``path`` (not a file) gives the gate no results CSV."""
    if not path.exists():
        return "no such file or directory"
    if not path.is_dir():
        return "not a file or directory the gate can read"
    runs = held_runs(path)
    if runs is None:
        return f"run directory has no {RESULTS_FILE}"
    return f"{runs}, not a {RESULTS_FILE}; the gate compares one run: give one of them"


def case_label(key: Key) -> str:
    """A short human name for a case key, without the provider."""
    v = dict(zip(KEY_COLUMNS, key))
    causal = " causal" if v["causal"].lower() == "true" else ""
    return (f"{v['mode']} {v['dtype']} b{v['batch']} s{v['seqlen']} q{v['q_len']} "
            f"h{v['heads']}/{v['kv_heads']} d{v['head_dim']}{causal} {v['pattern']} "
            f"bs{v['block_size']}{_page_label(v.get('page_size', '0'))}")


def _page_label(page_size: str) -> str:
    """" page16" for a paged decode case; nothing for a contiguous cache (0)."""
    return "" if page_size in ("0", "") else f" page{page_size}"


def _with_provider(key: Key, provider: str) -> Key:
    return key[:_PROVIDER_AT] + (provider,) + key[_PROVIDER_AT + 1:]


def _band(row: dict[str, Any]) -> float:
    ms, p20, p80 = _float(row["ms"]), _float(row["ms_p20"]), _float(row["ms_p80"])
    if not all(math.isfinite(x) for x in (ms, p20, p80)) or ms <= 0:
        return 0.0  # no recorded spread: the tolerance alone applies
    return abs(p80 - p20) / (2 * ms)


def _paired_band(row: dict[str, Any], speedup: float, otherwise: float) -> float:
    """The band of a recorded speedup from its own p20/p80 of paired ratios, when it has them."""
    p20, p80 = _float(row.get("speedup_p20")), _float(row.get("speedup_p80"))
    if not (math.isfinite(p20) and math.isfinite(p80)) or speedup <= 0:
        return otherwise  # not timed interleaved (or written before that was recorded)
    return abs(p80 - p20) / (2 * speedup)


def _value(table: _Table, key: Key, metric: str, against: str | None) -> tuple[float, float]:
    """(metric value, relative noise band) of one ok row."""
    row = table.rows[key]
    if metric != "speedup":
        return _float(row[metric]), _band(row)
    ref = table.rows.get(_with_provider(key, against))
    if ref is not None and ref["status"] != "ok":
        return math.nan, _band(row)  # the reference failed in this run: no trustworthy ratio
    band = _band(row) + (_band(ref) if ref is not None else 0.0)
    recorded = _float(row.get("speedup"))
    if _key_text(row.get("baseline", "")) == against and math.isfinite(recorded):
        return recorded, _paired_band(row, recorded, band)
    if ref is not None:
        return _float(ref["ms"]) / _float(row["ms"]), band
    return math.nan, band


def _status_note(row: dict[str, Any]) -> str:
    message = _key_text(row.get("message", ""))
    return row["status"] + (f": {message}" if message else "")


def _compare_one(key: Key, base: _Table, cur: _Table, metric: str, against: str | None,
                 tolerance: float) -> Comparison | None:
    b_row, c_row = base.rows[key], cur.rows[key]
    b_ok, c_ok = b_row["status"] == "ok", c_row["status"] == "ok"
    provider, case = key[_PROVIDER_AT], case_label(key)
    ids = [_key_text(row.get("case_id", "")) for row in (b_row, c_row)]
    if all(ids) and ids[0] != ids[1]:
        # Same key columns, another problem: the case_id also hashes sm_scale, the seed and a
        # varlen or decode case's sequence lengths, which the key does not hold.
        return Comparison(case, provider, math.nan, math.nan, math.nan, math.nan, math.nan,
                          SKIPPED, f"not the same case: case_id {ids[0]} in baseline, {ids[1]} "
                          "in current (their specs differ in sm_scale, seed, length_spread or "
                          "lengths); gate against a baseline of the same spec")
    if b_ok and not c_ok:
        return Comparison(case, provider, math.nan, math.nan, math.nan, math.nan, math.nan,
                          FAILED, _status_note(c_row))
    if not (b_ok and c_ok):
        note = f"baseline {b_row['status']}, current {c_row['status']}"
        return Comparison(case, provider, math.nan, math.nan, math.nan, math.nan, math.nan,
                          SKIPPED, note)
    if against is not None:
        against = reference_for(provider, against)
    if metric == "speedup" and provider == against:
        return None  # its ratio to itself is 1 by construction
    throttled = [f"{t.label} {t.throttled[key]}" for t in (base, cur) if key in t.throttled]
    if throttled:
        return Comparison(case, provider, math.nan, math.nan, math.nan, math.nan, math.nan,
                          SKIPPED, "; ".join(throttled), throttled=True)
    b_val, b_band = _value(base, key, metric, against)
    c_val, c_band = _value(cur, key, metric, against)
    noise = b_band + c_band
    threshold = max(tolerance, noise)
    bad = [t.label for t, v in ((base, b_val), (cur, c_val)) if not (math.isfinite(v) and v > 0)]
    if bad:
        why = f"no ok {against} row" if metric == "speedup" else f"no {metric} value"
        return Comparison(case, provider, b_val, c_val, math.nan, math.nan, math.nan, SKIPPED,
                          f"{why} in {' and '.join(bad)}")
    change = c_val / b_val - 1
    worsening = -change if METRICS[metric] else change
    if worsening > threshold:
        verdict = REGRESSION
    elif -worsening > threshold:
        verdict = IMPROVED
    else:
        verdict = PASS
    return Comparison(case, provider, b_val, c_val, change, noise, threshold, verdict)


def _providers(*tables: _Table) -> set[str]:
    return {k[_PROVIDER_AT] for t in tables for k in t.rows}


def _apart(cur: _Table, base: _Table, gated: set[str]) -> str:
    """What keeps two tables' rows apart: the key columns with no value in common (an fp8 run
    against a bf16 one differs in dtype alone), else their providers."""
    columns = []
    for i, column in enumerate(KEY_COLUMNS):
        values = [sorted({k[i] for k in t.rows if k[_PROVIDER_AT] in gated}) for t in (cur, base)]
        if values[0] and values[1] and not set(values[0]) & set(values[1]):
            columns.append(f"{column} {values[0]} vs {values[1]}")
    if columns:
        return "no value in common in " + "; ".join(columns)
    return f"providers {sorted(_providers(cur))} vs {sorted(_providers(base))}"


def reference_for(provider: str, against: str) -> str:
    """The row a speedup of ``provider`` is over: ``against``'s, or, for a CUDA-graph row
    (``NAME+graph``), ``against``'s graph row, as the run measured it."""
    return graph_row_name(row_provider(against)[0]) if row_provider(provider)[1] else against


def resolve_against(base: _Table, cur: _Table, against: str | None) -> str:
    """The provider speedups are measured against: --against, else the rows' `baseline` column
    (where graph rows name their graph twin of the baseline, the baseline itself)."""
    if against:
        if row_provider(against)[1]:  # else eager rows would be gated over a graph replay
            raise BadInputError(
                f"--against {against}: name the provider, {row_provider(against)[0]}; each "
                f"{GRAPH_SUFFIX} row is measured against its {GRAPH_SUFFIX} row, every other "
                "row against the eager one")
        for table in (cur, base):
            if against not in _providers(table):
                raise BadInputError(
                    f"--against {against}: no such provider in {table.label} {table.path} "
                    f"(providers: {', '.join(sorted(_providers(table)))})")
        return against
    names = {row_provider(_key_text(r.get("baseline", "")))[0]
             for t in (cur, base) for r in t.rows.values()} - {""}
    if not names:
        raise BadInputError(f"{cur.path} and {base.path}: the 'baseline' column is empty; "
                            "pass --against PROVIDER or use --metric tflops|ms")
    if len(names) > 1:
        raise BadInputError(f"rows name several baseline providers ({', '.join(sorted(names))}); "
                            "pick one with --against")
    return names.pop()


def _notes(base: _Table, cur: _Table, metric: str) -> list[str]:
    notes = []
    for table in (cur, base):
        if any(_key_text(r.get("interpreter", "")).lower() == "true" for r in table.rows.values()):
            notes.append(f"{table.label} timings come from the Triton interpreter, "
                         "not from a GPU")
    gpus = [sorted({_key_text(r.get("gpu", "")) for r in t.rows.values()} - {""})
            for t in (base, cur)]
    if gpus[0] and gpus[1] and gpus[0] != gpus[1]:
        across = f"compared across GPUs ({', '.join(gpus[0])} vs {', '.join(gpus[1])})"
        if metric == "speedup":
            # The ratio cancels a slower machine of one model, not another model: a kernel's
            # speedup over a library differs between GPU generations.
            notes.append(f"speedup {across}: a kernel's speedup differs between GPU models; "
                         "gate against a baseline from the same GPU")
        else:
            notes.append(f"absolute {metric} {across}; --metric speedup is robust to that")
    return notes


def run_gate(current: Path, baseline: Path, *, metric: str = "speedup",
             against: str | None = None, tolerance: float = 0.05,
             providers: Iterable[str] | None = None, fail_on_missing: bool = False) -> GateResult:
    """Compare `current` against `baseline` (run directories or CSV files); see the module doc."""
    if metric not in METRICS:
        raise BadInputError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    if against is not None and not against.strip():  # else the rows' baseline, in silence
        raise BadInputError(f"--against {against!r}: names no provider; give the provider the "
                            "speedup is measured against, or leave it out for the rows' baseline")
    against = against.strip() if against is not None else None  # as --providers' names are
    if against is not None and metric != "speedup":
        raise BadInputError(f"--against {against}: applies to --metric speedup only "
                            f"(--metric {metric} is not measured against a provider); leave it "
                            "out")
    if METRICS[metric] and tolerance >= 1:
        # A higher-is-better value falls by at most 100% (to 0): no row could ever fail.
        raise BadInputError(f"--tolerance {tolerance * 100:g}% with --metric {metric}: no drop "
                            "of a higher-is-better metric can exceed 100%, so the gate could "
                            "never fail; give a percentage from 0 to below 100 (or gate on "
                            "--metric ms, which may rise without bound)")
    required = [*KEY_COLUMNS, *_TIMING_COLUMNS]
    if metric == "tflops":
        required.append("tflops")
    elif metric == "speedup" and not against:
        required.append("baseline")
    cur = load_table(current, "current", required)
    base = load_table(baseline, "baseline", required)
    ref = resolve_against(base, cur, against) if metric == "speedup" else None

    gated = _providers(cur, base)
    if providers is not None:
        wanted = {p.strip() for p in providers if p.strip()}
        if not wanted:
            raise BadInputError(f"--providers {','.join(providers)!r}: names no provider; give "
                                f"a comma list of {', '.join(sorted(gated))}, or leave it out "
                                "to gate them all")
        unknown = wanted - gated
        if unknown:
            raise BadInputError(f"--providers: unknown {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(sorted(gated))})")
        gated = wanted

    shared = [k for k in cur.rows if k in base.rows and k[_PROVIDER_AT] in gated]
    if not shared:
        raise BadInputError(
            f"no rows in common between current {cur.path} and baseline {base.path} "
            f"(matched on {', '.join(KEY_COLUMNS)}; {_apart(cur, base, gated)})")
    compared = [_compare_one(k, base, cur, metric, ref, tolerance) for k in shared]
    comparisons = [c for c in compared if c is not None]
    one_sided = [OneSided(case_label(k), k[_PROVIDER_AT], t.label, t.rows[k]["status"])
                 for t, other in ((base, cur), (cur, base))
                 for k in t.rows if k not in other.rows and k[_PROVIDER_AT] in gated]
    notes = _notes(base, cur, metric)
    # A worsening of a higher-is-better metric is at most 100% (the value falls to 0): a threshold
    # at or above it passes whatever the current row measured.
    blind = [c for c in comparisons if c.verdict == PASS and METRICS[metric] and c.threshold >= 1]
    if blind:
        notes.append(f"{_rows(len(blind))} passed with a p20-p80 spread so wide (threshold "
                     f"{min(c.threshold for c in blind):.0%} or more) that no drop could fail "
                     f"{'them' if len(blind) > 1 else 'it'}, e.g. {blind[0].provider} "
                     f"{blind[0].case} (a longer timing.rep_ms narrows it)")
    throttled = sum(c.throttled for c in comparisons)
    if throttled:
        notes.append(f"{throttled} row{'s' * (throttled > 1)} skipped as throttled (median SM "
                     f"clock more than {THROTTLE_FRACTION:.0%} below its run's median): they do "
                     "not fail the gate; rerun them on a steady GPU")
    return GateResult(metric, ref, tolerance, comparisons, one_sided, fail_on_missing, notes,
                      against_rows=len(compared) - len(comparisons))
