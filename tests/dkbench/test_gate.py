"""`dkbench gate`: verdicts, metric direction, noise bands and bad input, via library and CLI."""

from __future__ import annotations

import math
import traceback
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from dkbench.commands.gate import gate
from dkbench.errors import BadInputError
from dkbench.gate.compare import (
    FAILED,
    IMPROVED,
    PASS,
    REGRESSION,
    SKIPPED,
    parse_tolerance,
    run_gate,
)
from dkbench.results.schema import RESULTS_FILE, ResultRow, append_row

# -- fixtures: rows built from ResultRow --

BASE = "sdpa_math"  # the sweep's baseline provider in these fixtures
SEQLENS = (1024, 2048)
MS = {"sdpa_math": 4.0, "sdpa_flash": 2.0, "dkernel": 1.0}  # median ms before any change
FLOPS = 4e9


def make_row(provider: str, seqlen: int, ms: float, spread: float = 0.01, **overrides) -> ResultRow:
    """One ok row; `spread` is the relative half-width of its p20-p80 interval."""
    row = ResultRow(
        run_id="run", timestamp="2024-01-01T00:00:00", gpu="NVIDIA H100", torch_version="2.5",
        triton_version="3.1", git_sha="abc", interpreter=False, case_id=f"c{seqlen}",
        provider=provider, mode="fwd", dtype="bf16", batch=1, seqlen=seqlen, q_len=seqlen,
        heads=8, kv_heads=8, head_dim=64, causal=True, pattern="local_stride(4,2)",
        pattern_hash="h", block_size=64, density=0.25, seed=0,
        ms=ms, ms_p20=ms * (1 - spread), ms_p80=ms * (1 + spread),
        flops=FLOPS, tflops=FLOPS / (ms * 1e-3) / 1e12, baseline=BASE,
    )
    return replace(row, **overrides)


def make_run(ms: dict[str, float] | None = None, spread: dict[str, float] | None = None,
             seqlens: tuple[int, ...] = SEQLENS, **overrides) -> list[ResultRow]:
    """Every provider x seqlen, the speedup column computed against BASE in the same run."""
    ms, spread = {**MS, **(ms or {})}, spread or {}
    return [make_row(p, s, ms[p], spread.get(p, 0.01), speedup=ms[BASE] / ms[p], **overrides)
            for s in seqlens for p in MS]


def write_run(run_dir: Path, rows: list[ResultRow]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        append_row(run_dir / RESULTS_FILE, row)
    return run_dir


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "base", make_run())


NO_SPREAD = {p: 0.0 for p in MS}

# -- CLI helpers --

APP = typer.Typer()


@APP.callback()
def _main() -> None:
    """Force `gate` to be a subcommand, as in the real app."""


APP.command("gate")(gate)


def invoke(*args: object) -> "typer.testing.Result":
    # a wide terminal so that rich does not wrap table cells the assertions look for
    return CliRunner().invoke(APP, ["gate", *map(str, args)], env={"COLUMNS": "250"})


def check(result, code: int) -> str:
    detail = result.output
    if result.exc_info and not isinstance(result.exception, SystemExit):
        detail += "".join(traceback.format_exception(*result.exc_info))
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}:\n{detail}"
    return result.output


def verdicts(result) -> dict[tuple[str, str], str]:
    return {(c.case.split()[3], c.provider): c.verdict for c in result.comparisons}


# -- verdicts --

def test_unchanged_passes(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run())
    out = check(invoke(cur, "--baseline", base_dir), 0)
    assert "PASS: 4 compared" in out, out


def test_ten_percent_slowdown_fails(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run(ms={"dkernel": 1.1}))
    out = check(invoke(cur, "--baseline", base_dir), 1)
    assert "REGRESSION" in out and "FAIL: 4 compared, 2 regressed" in out, out
    res = run_gate(cur, base_dir)
    assert {c.provider for c in res.regressions} == {"dkernel"}
    assert all(math.isclose(c.change, 1 / 1.1 - 1) for c in res.regressions)


def test_speedup_passes_as_improved(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run(ms={"dkernel": 0.8}))
    out = check(invoke(cur, "--baseline", base_dir), 0)
    assert "IMPROVED" in out and "2 improved" in out, out


def test_change_inside_tolerance_passes_and_beyond_fails(tmp_path):
    base = write_run(tmp_path / "base", make_run(spread=NO_SPREAD))
    cur = write_run(tmp_path / "cur", make_run(ms={"dkernel": 1.03}, spread=NO_SPREAD))
    check(invoke(cur, "--baseline", base, "--tolerance", "5%"), 0)
    check(invoke(cur, "--baseline", base, "--tolerance", "1%"), 1)


def test_change_inside_noise_passes(tmp_path):
    # 1% half-width on each of 4 timings: a band of 4%, wider than the 3% drop and the 1% tolerance
    base = write_run(tmp_path / "base", make_run())
    cur = write_run(tmp_path / "cur", make_run(ms={"dkernel": 1.03}))
    check(invoke(cur, "--baseline", base, "--tolerance", "1"), 0)
    res = run_gate(cur, base, tolerance=0.01)
    assert all(math.isclose(c.noise, 0.04) for c in res.comparisons), res.comparisons


def test_beyond_tolerance_inside_wide_spread_passes(tmp_path):
    wide = {"dkernel": 0.08}
    base = write_run(tmp_path / "base", make_run(spread=wide))
    cur = write_run(tmp_path / "cur", make_run(ms={"dkernel": 1.1}, spread=wide))
    out = check(invoke(cur, "--baseline", base), 0)
    assert "±18.0%" in out, out


def test_speedup_band_includes_against_provider_spread(tmp_path):
    # only the reference provider is noisy; the ratio inherits its noise
    wide = {BASE: 0.06}
    base = write_run(tmp_path / "base", make_run(spread=wide))
    cur = write_run(tmp_path / "cur", make_run(ms={"dkernel": 1.1}, spread=wide))
    check(invoke(cur, "--baseline", base), 0)
    check(invoke(cur, "--baseline", base, "--metric", "ms"), 1)


def paired(rows: list[ResultRow], spread: float) -> list[ResultRow]:
    """Rows as an interleaved run writes them: each speedup with its paired ratios' p20/p80."""
    return [replace(r, speedup_p20=r.speedup * (1 - spread), speedup_p80=r.speedup * (1 + spread))
            if r.provider != BASE else r for r in rows]


def test_paired_spread_replaces_the_sum_of_ms_bands(tmp_path):
    # The same 10% slowdown of dkernel, twice. The providers' ms spreads are wide (the drift each
    # saw), so the old rule's band (7% a side) covers the drop; the paired ratios are tight (1% a
    # side), since the drift cancels in them, and the drop is a regression.
    wide = {p: 0.035 for p in MS}
    slower = make_run(ms={"dkernel": 1.1}, spread=wide)
    base = write_run(tmp_path / "base", make_run(spread=wide))
    assert run_gate(write_run(tmp_path / "old", slower), base).passed
    base = write_run(tmp_path / "pbase", paired(make_run(spread=wide), 0.01))
    res = run_gate(write_run(tmp_path / "new", paired(slower, 0.01)), base)
    assert verdicts(res)[("s1024", "dkernel")] == REGRESSION, res.comparisons
    dk = [c for c in res.comparisons if c.provider == "dkernel"]
    assert all(math.isclose(c.noise, 0.02) for c in dk), dk
    # and the other way: tight ms, but paired ratios that spread wider than the drop
    tight = make_run(ms={"dkernel": 1.1}, spread=NO_SPREAD)
    base = write_run(tmp_path / "tbase", make_run(spread=NO_SPREAD))
    assert not run_gate(write_run(tmp_path / "tight", tight), base).passed
    base = write_run(tmp_path / "wbase", paired(make_run(spread=NO_SPREAD), 0.06))
    assert run_gate(write_run(tmp_path / "wide", paired(tight, 0.06)), base).passed


def test_paired_band_on_one_side_only(tmp_path):
    # a baseline file from before paired ratios were recorded: its side keeps the ms rule
    wide = {p: 0.035 for p in MS}
    base = write_run(tmp_path / "base", make_run(spread=wide))
    cur = write_run(tmp_path / "cur", paired(make_run(ms={"dkernel": 1.1}, spread=wide), 0.01))
    dk = [c for c in run_gate(cur, base).comparisons if c.provider == "dkernel"]
    assert all(math.isclose(c.noise, 0.07 + 0.01) for c in dk), dk


def test_old_csv_without_paired_columns_gates(tmp_path, base_dir):
    frame = pd.read_csv(base_dir / RESULTS_FILE)
    old = tmp_path / "old.csv"
    frame.drop(columns=["speedup_p20", "speedup_p80"]).to_csv(old, index=False)
    cur = write_run(tmp_path / "cur", paired(make_run(ms={"dkernel": 1.1}), 0.01))
    res = run_gate(cur, old)
    assert {c.provider for c in res.regressions} == {"dkernel"}
    assert run_gate(old, old).passed


def test_failed_row_is_a_regression(tmp_path, base_dir):
    rows = make_run()
    rows[2] = replace(rows[2], status="oom", message="CUDA out of memory", ms=float("nan"))
    cur = write_run(tmp_path / "cur", rows)
    out = check(invoke(cur, "--baseline", base_dir), 1)
    assert "FAILED (oom: CUDA out of memory)" in out and "1 failed" in out, out


def test_failed_against_provider_fails_and_skips_its_ratios(tmp_path, base_dir):
    rows = [replace(r, status="error") if r.provider == BASE and r.seqlen == 1024 else r
            for r in make_run()]
    res = run_gate(write_run(tmp_path / "cur", rows), base_dir)
    v = verdicts(res)
    assert v[("s1024", BASE)] == FAILED
    assert v[("s1024", "dkernel")] == SKIPPED and v[("s2048", "dkernel")] == PASS, v
    assert not res.passed


def test_failed_on_both_sides_is_skipped(tmp_path):
    rows = [replace(r, status="unsupported") if r.provider == "sdpa_flash" else r
            for r in make_run()]
    base = write_run(tmp_path / "base", rows)
    cur = write_run(tmp_path / "cur", rows)
    res = run_gate(cur, base)
    assert res.passed and verdicts(res)[("s1024", "sdpa_flash")] == SKIPPED


def test_against_rows_not_gated_under_speedup(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run())
    assert BASE not in {c.provider for c in run_gate(cur, base_dir).comparisons}
    assert BASE in {c.provider for c in run_gate(cur, base_dir, metric="ms").comparisons}


def test_missing_rows_listed_and_fail_on_request(tmp_path, base_dir):
    rows = [r for r in make_run(seqlens=(1024, 2048, 4096))
            if not (r.provider == "dkernel" and r.seqlen == 2048)]
    cur = write_run(tmp_path / "cur", rows)
    out = check(invoke(cur, "--baseline", base_dir), 0)
    assert "s2048" in out and "dkernel: only in baseline (ok)" in out, out
    assert "only in current" in out and "4 on one side only" in out, out
    out = check(invoke(cur, "--baseline", base_dir, "--fail-on-missing"), 1)
    assert "FAIL" in out, out


def test_run_dir_and_csv_path_both_accepted(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run(ms={"dkernel": 1.1}))
    check(invoke(cur / RESULTS_FILE, "--baseline", base_dir), 1)
    check(invoke(cur, "--baseline", base_dir / RESULTS_FILE), 1)


def test_providers_filter(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run(ms={"dkernel": 1.1}))
    check(invoke(cur, "--baseline", base_dir, "--providers", "sdpa_flash"), 0)
    check(invoke(cur, "--baseline", base_dir, "--providers", "sdpa_flash,dkernel"), 1)


# -- metric direction --

@pytest.mark.parametrize("metric", ["ms", "tflops"])
def test_absolute_metrics_direction(tmp_path, base_dir, metric):
    slower = write_run(tmp_path / "slow", make_run(ms={"dkernel": 1.1}))
    faster = write_run(tmp_path / "fast", make_run(ms={"dkernel": 0.9}))
    check(invoke(slower, "--baseline", base_dir, "--metric", metric), 1)
    res = run_gate(faster, base_dir, metric=metric)
    assert res.passed and verdicts(res)[("s1024", "dkernel")] == IMPROVED, res.comparisons
    want = 0.9 - 1 if metric == "ms" else 1 / 0.9 - 1
    assert math.isclose(res.comparisons[2].change, want), res.comparisons[2]


def test_slower_machine_fails_absolute_but_not_speedup(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run(ms={p: v * 1.5 for p, v in MS.items()}))
    check(invoke(cur, "--baseline", base_dir), 0)
    check(invoke(cur, "--baseline", base_dir, "--metric", "ms"), 1)
    check(invoke(cur, "--baseline", base_dir, "--metric", "tflops"), 1)


def test_against_another_provider_recomputes(tmp_path, base_dir):
    # flash got faster; dkernel is unchanged, so only its ratio to flash drops
    cur = write_run(tmp_path / "cur", make_run(ms={"sdpa_flash": 1.5}))
    check(invoke(cur, "--baseline", base_dir), 0)
    check(invoke(cur, "--baseline", base_dir, "--against", "sdpa_flash"), 1)
    res = run_gate(cur, base_dir, against="sdpa_flash")
    dk = [c for c in res.comparisons if c.provider == "dkernel"]
    assert [(c.baseline, c.current, c.verdict) for c in dk] == [(2.0, 1.5, REGRESSION)] * 2
    assert "sdpa_flash" not in {c.provider for c in res.comparisons}


# -- output --

def test_markdown_written(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run(ms={"dkernel": 1.1}))
    md = tmp_path / "gate.md"
    check(invoke(cur, "--baseline", base_dir, "--markdown", md), 1)
    text = md.read_text()
    lines = text.splitlines()
    assert "| case | provider | baseline | current | change | noise | verdict |" in lines, text
    rows = [ln for ln in lines if ln.startswith("| fwd bf16")]
    assert len(rows) == 4 and "dkernel" in rows[0] and "REGRESSION" in rows[0], text
    assert "-9.1%" in rows[0] and "**FAIL" in text, text


def test_interpreter_timings_noted(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run(interpreter=True))
    out = check(invoke(cur, "--baseline", base_dir), 0)
    assert "current timings come from the Triton interpreter" in out, out


# -- bad input --

@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00", b"hello world\n", b""])
def test_not_a_csv_exits_2(tmp_path, base_dir, content):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    res = invoke(bad, "--baseline", base_dir)
    check(res, 2)
    assert "current" in res.stderr and "bad.csv" in res.stderr, res.output


def test_missing_columns_named(tmp_path, base_dir):
    frame = pd.read_csv(base_dir / RESULTS_FILE)
    bad = tmp_path / "old.csv"
    frame.drop(columns=["ms_p80", "pattern"]).to_csv(bad, index=False)
    res = invoke(base_dir, "--baseline", bad)
    check(res, 2)
    assert "baseline" in res.stderr and "old.csv" in res.stderr, res.output
    assert "missing columns pattern, ms_p80" in res.stderr, res.output


def test_no_overlap_exits_2(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run(seqlens=(4096,)))
    res = invoke(cur, "--baseline", base_dir)
    check(res, 2)
    assert "no rows in common" in res.stderr, res.output


def test_missing_paths_exit_2(tmp_path, base_dir):
    res = invoke(tmp_path / "nope.csv", "--baseline", base_dir)
    check(res, 2)
    assert "no such file" in res.stderr, res.output
    (tmp_path / "empty_run").mkdir()
    res = invoke(tmp_path / "empty_run", "--baseline", base_dir)
    check(res, 2)
    assert "run directory has no results.csv" in res.stderr, res.output


def test_duplicate_rows_exit_2(tmp_path, base_dir):
    cur = write_run(tmp_path / "cur", make_run() + make_run()[:1])
    res = invoke(cur, "--baseline", base_dir)
    check(res, 2)
    assert "two rows for the same case" in res.stderr, res.output


@pytest.mark.parametrize("args, words", [
    (["--metric", "throughput"], "--metric"),
    (["--against", "nope"], "--against nope"),
    (["--providers", "dkernel,nope"], "unknown nope"),
    (["--tolerance", "-5"], "between 0 and 100"),
    (["--tolerance", "abc"], "expected a percentage"),
    (["--tolerance", "5%%"], "expected a percentage"),
    (["--tolerance", "nan"], "between 0 and 100"),
])
def test_bad_flags_exit_2(tmp_path, base_dir, args, words):
    cur = write_run(tmp_path / "cur", make_run())
    res = invoke(cur, "--baseline", base_dir, *args)
    check(res, 2)
    assert words in res.stderr, res.output


def test_empty_baseline_column_needs_against(tmp_path):
    base = write_run(tmp_path / "base", make_run(baseline=""))
    cur = write_run(tmp_path / "cur", make_run(baseline=""))
    res = invoke(cur, "--baseline", base)
    check(res, 2)
    assert "--against" in res.stderr, res.output
    check(invoke(cur, "--baseline", base, "--against", BASE), 0)


@pytest.mark.parametrize("text, want", [("5%", 0.05), ("5", 0.05), (" 2.5 % ", 0.025),
                                        ("0.05", 0.0005), ("0", 0.0)])
def test_parse_tolerance(text, want):
    assert math.isclose(parse_tolerance(text), want, abs_tol=1e-12)


def test_parse_tolerance_rejects():
    for text in ("-1", "", "five", "inf", "101"):
        with pytest.raises(BadInputError):
            parse_tolerance(text)


# -- throttled rows --

def clocked(rows: list[ResultRow], slow: tuple[str, int] | None = None,
            mhz: float = 1400.0) -> list[ResultRow]:
    """Every row at 1800 MHz, the (provider, seqlen) ``slow`` one at ``mhz``."""
    return [replace(r, clock_mhz_median=mhz if (r.provider, r.seqlen) == slow else 1800.0)
            for r in rows]


@pytest.mark.parametrize("side", ["current", "baseline"])
def test_a_throttled_row_on_either_side_is_skipped_not_failed(tmp_path, side):
    slow = ("dkernel", 1024)
    base_rows, cur_rows = clocked(make_run()), clocked(make_run(ms={"dkernel": 1.3}))
    if side == "current":
        cur_rows = clocked(make_run(ms={"dkernel": 1.3}), slow)
    else:
        base_rows = clocked(make_run(), slow)
    base, cur = write_run(tmp_path / "base", base_rows), write_run(tmp_path / "cur", cur_rows)
    res = run_gate(cur, base)
    got = verdicts(res)
    assert got[("s1024", "dkernel")] == SKIPPED
    assert got[("s2048", "dkernel")] == REGRESSION  # the same slowdown, not throttled
    (skip,) = [c for c in res.comparisons if c.throttled]
    assert skip.note == f"{side} throttled (clock 1400 MHz, run median 1800 MHz)"
    assert any("1 row skipped as throttled" in n for n in res.notes)
    out = check(invoke(cur, "--baseline", base), 1)  # s2048 still regresses
    assert "SKIPPED" in out and "throttled (clock 1400 MHz" in out, out
    assert "1 row skipped as throttled (median SM clock more than 10% below its run's" in out


def test_only_throttled_slowdowns_pass(tmp_path, base_dir):
    rows = clocked(make_run(ms={"dkernel": 1.3}), ("dkernel", 1024))
    rows = [replace(r, clock_mhz_median=1400.0) if r.provider == "dkernel" else r for r in rows]
    cur = write_run(tmp_path / "cur", rows)
    out = check(invoke(cur, "--baseline", base_dir), 0)
    assert "PASS: 2 compared, 2 skipped" in out, out
