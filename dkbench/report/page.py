"""`dkbench report`: a Markdown page for a run directory, a tune directory (`dkbench tune`'s), or a
directory of them: the environment, a summary table per case with the fastest provider marked, the
break-even densities of a density sweep, the failed rows with their messages, the tuned configs,
and the figures from `dkbench.report.plots`, linked by relative path (with those not drawn and
why). A view of the CSVs alone."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import pandas as pd

from ..errors import BadInputError
from ..names import BUNDLED_PROVIDER
from ..results.runs import INTERPRETER_NOTE, TUNE_FILE, Run, TuneDir, load_sources
from ..results.schema import KEY_COLUMNS, META_FILE, RESULTS_FILE, check_out_dir
from .density import density_facets
from .digits import distinct_digits
from .figure import written_whole
from .markdown import Md, code, escape, table
from .plots import SkippedFigure, build_figures, output_root, save_figures
from .tune_plots import KERNEL_ORDER, winner

REPORT_FILE = "report.md"
WINNER = "★"
# (row label, meta.json keys tried in order, at the top level and then under "environment").
META_FIELDS = (
    ("run name", ("name",)),
    ("GPU", ("gpu", "gpu_name", "device")),
    ("torch", ("torch", "torch_version")),
    ("triton", ("triton", "triton_version")),
    ("python", ("python", "python_version")),
    ("spec", ("spec_name", "spec", "sweep", "spec_path")),
    ("command", ("command", "argv", "cmd")),
)
CSV_PROVENANCE = ("run_id", "gpu", "torch_version", "triton_version", "git_sha", "interpreter",
                  "timer", "command")
CASE_COLUMNS = tuple(c for c in KEY_COLUMNS if c != "provider")
_MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd_bwd": 2, "prefill_varlen": 3, "decode": 4}


def _num(value: float, fmt: str) -> str:
    return "—" if pd.isna(value) else format(value, fmt)


def _rate(value: float) -> str:
    """A TFLOP/s: one decimal, or three significant digits below 1 (an interpreter's 5.4e-05
    is not 0.0)."""
    return _num(value, ".1f" if pd.isna(value) or abs(value) >= 1 else ".3g")


def _ratio(value: float, decimals: int) -> str:
    """A speedup to ``decimals`` places, more where that would show fewer than two significant
    digits (0.0021, not 0.00)."""
    if pd.isna(value):
        return "—"
    if 0 < abs(value) < 1:
        decimals = max(decimals, 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def _meta_value(meta: dict, keys: Sequence[str]) -> object:
    environment = meta.get("environment") if isinstance(meta.get("environment"), dict) else {}
    for key in keys:
        value = meta.get(key, environment.get(key))
        if isinstance(value, dict):  # e.g. {"spec": {"name": ..., "path": ...}}
            value = value.get("name") or value.get("path")
        if value not in (None, ""):
            return value
    return None


def _csv_values(df: pd.DataFrame, column: str) -> str:
    if column not in df.columns:
        return "—"
    values = sorted({str(v) for v in df[column].dropna() if str(v) != ""})
    return ", ".join(values) if values else "—"


def _frame(source: Run | TuneDir) -> pd.DataFrame:
    return source.tune if isinstance(source, TuneDir) else source.results


def _provenance(source: Run | TuneDir, column: str) -> str:
    """A provenance column's values; tune.csv has few of them, so meta.json's environment
    fills in for a tune directory (torch_version is its "torch")."""
    value = _csv_values(_frame(source), column)
    if value == "—" and isinstance(source, TuneDir):
        meta = _meta_value(source.meta, (column, column.removesuffix("_version")))
        value = "—" if meta is None else str(meta)
    return value


def environment_section(runs: Sequence[Run], tunes: Sequence[TuneDir] = ()) -> list[str]:
    """One column per run (then per tune directory): meta.json's environment, then the CSV's
    provenance columns."""
    sources = [*runs, *tunes]
    rows = [[label, *(_meta_value(s.meta, keys) for s in sources)] for label, keys in META_FIELDS]
    rows += [[Md(f"csv {code(c)}"), *(_provenance(s, c) for s in sources)]
             for c in CSV_PROVENANCE]
    rows.append(["csv timestamps", *(_csv_span(_frame(s)) for s in sources)])
    rows.append(["rows (by status)", *(_status_counts(_frame(s)) for s in sources)])
    return ["## Environment", "", *table(["", *(s.label for s in sources)], rows), ""]


def _csv_span(df: pd.DataFrame) -> str:
    stamps = sorted(str(t) for t in df.get("timestamp", pd.Series(dtype=str)).dropna())
    return f"{stamps[0]} to {stamps[-1]}" if stamps else "—"


def _status_counts(df: pd.DataFrame) -> str:
    counts = df["status"].value_counts()
    return f"{len(df)} (" + ", ".join(f"{s} {n}" for s, n in counts.items()) + ")"


def _case_order(case: pd.DataFrame) -> tuple:
    first = case.iloc[0]
    return (str(first["pattern"]), _MODE_ORDER.get(first["mode"], 9), str(first["mode"]),
            str(first["dtype"]), float(first["seqlen"]))


def _shape_value(value: object) -> str:
    """A shape value as the CSV means it: 32, not the 32.0 of a column with an empty cell."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _case_heading(case: pd.DataFrame) -> str:
    first = case.iloc[0]
    parts = [f"seqlen {_num(first['seqlen'], 'g')}"]
    for col, name in (("q_len", "q_len"), ("batch", "batch"), ("heads", "heads"),
                      ("kv_heads", "kv_heads"), ("head_dim", "head_dim"), ("block_size", "block"),
                      ("causal", "causal"), ("density", "density"), ("page_size", "page")):
        if col == "page_size" and col in case.columns and not first[col]:
            continue  # a contiguous cache: nothing to say
        if col in case.columns and pd.notna(first[col]):
            parts.append(f"{name} {first[col]:.4g}" if col == "density"
                         else f"{name} {escape(_shape_value(first[col]))}")
    baselines = sorted({str(b) for b in case["baseline"] if b})
    if baselines:
        parts.append("baseline " + ", ".join(escape(b) for b in baselines))
    case_id = f"{code(first['case_id'])}: " if "case_id" in case.columns else ""
    return case_id + ", ".join(parts)


def case_table(case: pd.DataFrame) -> list[str]:
    """One case's providers: median ms (p20-p80), TFLOP/s, speedup (with the p20-p80 of its
    paired ratios when timed interleaved), status; the fastest ok row starred. A failed row shows no numbers: a failed measurement is not a measurement."""
    ok = case[(case["status"] == "ok") & case["ms"].notna()]
    # Every row at the fastest time is starred: a tie has no single winner.
    winners = set(ok.index[ok["ms"] == ok["ms"].min()]) if len(ok) else set()
    # Enough digits that two different times (or speedups) never read the same.
    ms_digits = distinct_digits(ok["ms"], lambda v, d: f"{v:.{d}g}", 4)
    ratios = ok.loc[ok["provider"] != ok["baseline"], "speedup"]
    x_digits = distinct_digits(ratios, _ratio, 2)
    rows = []
    for idx, r in case.sort_values("provider").iterrows():
        if r["status"] != "ok":
            rows.append([r["provider"], "—", "—", "—", "—", r["status"]])
            continue
        name = Md(f"**{escape(r['provider'])}** {WINNER}") if idx in winners else r["provider"]
        fmt = f".{ms_digits}g"
        ms = f"{_num(r['ms'], fmt)} ({_num(r['ms_p20'], fmt)}–{_num(r['ms_p80'], fmt)})"
        if r["provider"] == r["baseline"]:
            speed = "baseline"
        else:
            speed = "—" if pd.isna(r["speedup"]) else f"{_ratio(r['speedup'], x_digits)}×"
            p20, p80 = r.get("speedup_p20", float("nan")), r.get("speedup_p80", float("nan"))
            if not (pd.isna(r["speedup"]) or pd.isna(p20) or pd.isna(p80)):
                # p20-p80 of its paired ratios
                speed += f" ({_ratio(p20, x_digits)}–{_ratio(p80, x_digits)})"
        rows.append([name, ms, _rate(r["tflops"]), _rate(r["dense_tflops"]), speed,
                     r["status"]])
    header = ["provider", "median ms (p20–p80)", "TFLOP/s (computed)", "TFLOP/s (dense-eq.)",
              "speedup (p20–p80)", "status"]
    return table(header, rows)


def summary_section(run: Run, title: str = "## Summary") -> list[str]:
    """Per (pattern, mode, dtype) a heading, and under it a table per case."""
    df = run.results
    keys = [c for c in CASE_COLUMNS if c in df.columns]
    cases = sorted((g for _, g in df.groupby(keys, dropna=False)), key=_case_order)
    lines = [title, "", f"{WINNER} marks the fastest provider of a case (median ms, status ok).",
             ""]
    facet = None
    for case in cases:
        first = case.iloc[0]
        if (first["pattern"], first["mode"], first["dtype"]) != facet:
            facet = (first["pattern"], first["mode"], first["dtype"])
            lines += [f"### {code(facet[0])} · {escape(facet[1])} · {escape(facet[2])}", ""]
        lines += [_case_heading(case), "", *case_table(case), ""]
    return lines


def breakeven_section(runs: Sequence[Run]) -> list[str]:
    """Per shape of a density sweep, the density below which the bundled kernel beats the
    fastest dense provider (`dkbench.report.density`); nothing when the runs hold no such sweep."""
    facets = density_facets(pd.concat([r.results for r in runs], ignore_index=True))
    if not facets:
        return []
    many = len({f.run for f in facets}) > 1
    rows = []
    for f in facets:
        result = f.result
        rows.append(([f.run] if many else []) + [
            f.key.get("seqlen"), f.key.get("mode"), f.key.get("dtype"),
            "no dense provider ran ok" if result is None else result.text(),
            f.dense_provider or "—", "—" if f.dense_ms is None else f"{f.dense_ms:.4g}",
            ", ".join(f"{d:.3g}" for d, _ in f.ours)])
    header = (["run"] if many else []) + [
        "seqlen", "mode", "dtype", "break-even density", "fastest dense provider",
        "its median ms", "densities measured"]
    return ["## Break-even density", "",
            f"Below the break-even density `{BUNDLED_PROVIDER}` is faster than the fastest dense "
            "provider (interpolated linearly between the two measured densities around the "
            "crossing).", "",
            *table(header, rows), ""]


def failed_section(runs: Sequence[Run]) -> list[str]:
    """Every row whose status is not ok, with its message."""
    cols = ["case_id", "provider", "mode", "dtype", "seqlen", "status", "message"]
    rows = []
    for run in runs:
        bad = run.results[run.results["status"] != "ok"]
        for _, r in bad.iterrows():
            rows.append(([run.label] if len(runs) > 1 else []) + [r.get(c) for c in cols])
    lines = ["## Failed rows", ""]
    if not rows:
        return lines + ["None: every row has status ok.", ""]
    return lines + table((["run"] if len(runs) > 1 else []) + cols, rows) + [""]


def notes_section(runs: Sequence[Run]) -> list[str]:
    """Every ok row whose message says something (`throttled (clock X MHz, ...)`): its time is in
    the tables above, where the message is not; nothing when no ok row has one."""
    cols = ["case_id", "provider", "mode", "dtype", "seqlen", "message"]
    rows = []
    for run in runs:
        df = run.results
        if "message" not in df.columns:
            continue
        noted = df[(df["status"] == "ok") & (df["message"].astype(str).str.strip() != "")]
        for _, r in noted.iterrows():
            rows.append(([run.label] if len(runs) > 1 else []) + [r.get(c) for c in cols])
    if not rows:
        return []
    return ["## Notes on ok rows", "",
            "Rows that ran ok with a message (a throttled GPU, say): read their times with it.",
            "", *table((["run"] if len(runs) > 1 else []) + cols, rows), ""]


def _config_text(row: pd.Series) -> str:
    text = (f"BLOCK_M={row['block_m']:g}, BLOCK_N={row['block_n']:g}, "
            f"num_warps={row['num_warps']:g}, num_stages={row['num_stages']:g}")
    impl = row.get("impl", "triton")
    return text + (f", impl={impl}" if isinstance(impl, str) and impl not in ("", "triton") else "")


def tuning_section(sources: Sequence[Run | TuneDir]) -> list[str]:
    """Per tuned (case, kernel): how many configs ran ok, the chosen one (tune's winner) and its
    gain over the default config; nothing when no source has a tune.csv."""
    tuned = [s for s in sources if s.tune is not None]
    rows = []
    for source in tuned:
        groups = sorted(source.tune.groupby(["case_id", "kernel"]), key=lambda kv: (
            str(kv[0][0]), KERNEL_ORDER.get(kv[0][1], 9), str(kv[0][1])))
        for (case_id, kernel), g in groups:
            best = winner(g)
            ok = int(((g["status"] == "ok") & g["ms"].notna()).sum())
            gain = best.get("speedup_vs_default") if best is not None else None
            rows.append(([source.label] if len(tuned) > 1 else []) + [
                case_id, kernel, f"{ok} of {len(g)}",
                "—" if best is None else _config_text(best),
                "—" if best is None else _num(best["ms"], ".4g"),
                "—" if gain is None or pd.isna(gain) else f"{float(gain):.2f}×"])
    if not rows:
        return []
    header = (["run"] if len(tuned) > 1 else []) + [
        "case_id", "kernel", "configs ok", "chosen config", "median ms", "vs default"]
    # Not "fastest": the default stays unless a config is clearly faster, so another config's
    # median can be lower than the chosen one's.
    return ["## Tuning", "", "The chosen config is the one `dkbench tune` cached: the default "
            "config unless another was clearly faster (beyond the timing noise).", "",
            *table(header, rows), ""]


def figures_section(figures: Sequence[tuple[str, Path]], report_dir: Path,
                    skipped: Sequence[SkippedFigure] = ()) -> list[str]:
    """Image links relative to the report, so the directory can be moved or published as is;
    then the figures not drawn, with why."""
    lines = ["## Figures", ""]
    for title, path in figures:
        rel = Path(os.path.relpath(path, report_dir)).as_posix()
        lines += [f"### {escape(title)}", "", f"![{escape(title)}]({quote(rel)})", ""]
    if not figures:
        lines += ["No figures.", ""]
    if skipped:
        lines += ["Not drawn:", "",
                  *(f"- {escape(s.title)}: {escape(s.reason)}" for s in skipped), ""]
    return lines


def render_report(runs: Sequence[Run], figures: Sequence[tuple[str, Path]] = (),
                  report_dir: Path = Path("."), tunes: Sequence[TuneDir] = (),
                  skipped: Sequence[SkippedFigure] = ()) -> str:
    """The report's Markdown text; `figures` are (title, file) pairs to link, `skipped` the
    figures not drawn; `tunes` are directories `dkbench tune` wrote, reported beside (or instead
    of) the runs."""
    sources = [*runs, *tunes]
    title = sources[0].label if len(sources) == 1 else f"{len(sources)} runs compared"
    lines = [f"# dkbench report: {escape(title)}", ""]
    interpreted = [escape(s.label) for s in sources if s.interpreter]
    if interpreted:
        lines += [f"> **Note:** {INTERPRETER_NOTE}: {', '.join(interpreted)}.", ""]
    lines += environment_section(runs, tunes)
    for run in runs:
        heading = "## Summary" if len(runs) == 1 else f"## Summary: {escape(run.label)}"
        lines += summary_section(run, heading)
    if runs:
        lines += breakeven_section(runs)
        lines += failed_section(runs)
        lines += notes_section(runs)
    lines += tuning_section(sources)
    lines += figures_section(figures, report_dir, skipped)
    return "\n".join(lines).rstrip() + "\n"


def report_file(path: Path, out: Path | None = None) -> Path:
    """Where the report goes: `out` (a file, or a directory for report.md: one that exists, or a
    new path without a suffix), else PATH/report.md."""
    if out is None:
        return output_root(path) / REPORT_FILE
    out = Path(out)
    # A new path without a suffix (results/report) is a directory to make, not a file "report".
    return out / REPORT_FILE if out.is_dir() or not (out.exists() or out.suffix) else out


def write_report(path: Path, out: Path | None = None) -> Path:
    """`dkbench report`: draw the figures as PNG beside the report, write it, return its path."""
    target = report_file(path, out)
    if out is not None:  # before anything is read or drawn
        check_out_dir(target.parent, given=out)
        if target.is_dir():
            raise BadInputError(f"--out {out}: {target} is a directory")
        if target.exists() and not target.is_file():  # a fifo would block the write forever
            raise BadInputError(f"--out {out}: is not a regular file (a fifo, socket or "
                                "device); give the Markdown file to write")
    runs, tunes = load_sources(path)
    _check_not_an_input(target, out, [s.path for s in (*runs, *tunes)])
    skipped: list[SkippedFigure] = []
    figures = build_figures(runs, tunes=tunes, skipped=skipped)
    written = save_figures(figures, target.parent, ("png",))
    links = [(nf.title, file) for nf, file in zip(figures, written)]
    text = render_report(runs, links, target.parent, tunes, skipped)
    try:
        with written_whole(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as err:
        raise BadInputError(f"{target}: cannot write the report ({err})") from None
    return target


def _check_not_an_input(target: Path, out: Path | None, sources: Sequence[Path]) -> None:
    """Refuse an --out that names a file of a run or tune directory being reported (its
    results.csv, meta.json, tune.csv, a log), or the results.csv, meta.json or tune.csv of any
    other run or tune directory (one holding a meta.json): the Markdown would replace rows."""
    # Its readers' files are refused even where absent: a report saved as a run's tune.csv
    # would make the run unreadable. Resolved: a link named x.md may point at a results.csv,
    # and a linked directory may be a run's.
    real = target.resolve()
    owned = real.name in (RESULTS_FILE, META_FILE, TUNE_FILE)
    if not (owned or real.is_file()) or real.suffix.lower() == ".md":
        return
    if any(real.parent == Path(source).resolve() for source in sources):
        raise BadInputError(f"--out {out}: is {real}, a file of a directory being "
                            "reported; give a new file (or a .md file) for the report")
    if owned and (real.parent / META_FILE).is_file():
        raise BadInputError(f"--out {out}: is {real}, the {real.name} of the run directory "
                            f"{real.parent} (it holds a {META_FILE}); give a new file (or a .md "
                            "file) for the report")
