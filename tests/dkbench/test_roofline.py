"""The roofline figure: every ok row at its arithmetic intensity and achieved rate, under the
ceilings of meta.json's calibration; skipped, saying why, without a calibration or bytes."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dkbench.commands.plot import plot, report
from dkbench.report.plots import build_figures
from dkbench.results.runs import load_runs
from dkbench.results.schema import COLUMNS, RESULTS_FILE
from tests.dkbench.fixtures_plot import META, sample_rows, write_run

CALIBRATION = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "torch": "2.11", "triton": "3.6",
               "matmul_tflops": {"bfloat16": 700.0, "float16": 690.0, "float8_e4m3fn": 1300.0},
               "copy_gbs": 3000.0, "sm_clock_mhz": 1755.0, "measured_at": "2026-12-01T00:00:00"}
# The fixture's rows are fp16; intensity per provider (FLOP/byte): sparse rows move fewer bytes.
BYTES_PER_FLOP = {"dkernel": 1 / 40, "flex": 1 / 20, "sdpa_flash": 1 / 400}


def with_bytes(rows):
    return [replace(r, row_bytes=r.flops * BYTES_PER_FLOP[r.provider]) for r in rows]


def run_dir(tmp_path: Path, rows=None, sol: dict | None = None) -> Path:
    meta = {**META, "speed_of_light": CALIBRATION if sol is None else sol}
    return write_run(tmp_path / "run", with_bytes(sample_rows()) if rows is None else rows, meta)


def figures(path: Path, skipped: list | None = None) -> dict:
    return {nf.name: nf.figure for nf in build_figures(load_runs(path), skipped=skipped)}


def test_every_ok_row_is_a_marker_at_its_intensity_and_rate(tmp_path: Path) -> None:
    path = run_dir(tmp_path)
    (ax,) = figures(path)["roofline"].axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    markers = [line for line in ax.get_lines() if line.get_gid() == "row"]
    got = sorted((line.get_label(), x, y) for line in markers
                 for x, y in zip(line.get_xdata(), line.get_ydata()))
    (run,) = load_runs(path)
    ok = run.results[run.results["status"] == "ok"]
    want = sorted((f"{r.provider} · {r.mode}", 1 / BYTES_PER_FLOP[r.provider], r.tflops)
                  for r in ok.itertuples())
    assert len(got) == len(want) == len(ok)
    for (label, x, y), (wlabel, wx, wy) in zip(got, want):
        assert label == wlabel and x == pytest.approx(wx) and y == pytest.approx(wy)
    # one colour per provider across modes, one marker per mode
    colors = {line.get_label().split(" · ")[0]: line.get_color() for line in markers}
    assert len(set(colors.values())) == 3
    assert {line.get_marker() for line in markers} == {"o", "s"}  # fwd, bwd


def test_the_ceilings_are_the_calibrated_bandwidth_and_the_rows_dtype_rate(tmp_path: Path) -> None:
    fig = figures(run_dir(tmp_path))["roofline"]
    (ax,) = fig.axes
    ceilings = {line.get_label(): line for line in ax.get_lines() if line.get_gid() == "ceiling"}
    # fp16 rows: the float16 rate only; the bandwidth slope is TFLOP/s = intensity * GB/s / 1000
    assert set(ceilings) == {"copy bandwidth 3000 GB/s", "float16 matrix rate 690 TFLOP/s"}
    slope = ceilings["copy bandwidth 3000 GB/s"]
    for x, y in zip(slope.get_xdata(), slope.get_ydata()):
        assert y == pytest.approx(x * 3.0)
    assert slope.get_xdata()[-1] == pytest.approx(690 / 3.0)  # it meets the flat line at the ridge
    flat = ceilings["float16 matrix rate 690 TFLOP/s"]
    assert list(flat.get_ydata()) == [690.0, 690.0]
    assert flat.get_xdata()[0] == pytest.approx(690 / 3.0)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"dkernel", "flex", "sdpa_flash", "fwd", "bwd"} <= set(legend)


@pytest.mark.parametrize(("sol", "rows", "reason"), [
    ({"unavailable": "no CUDA device (interpreter timings have no speed of light)"}, None,
     "no calibration in meta.json (no CUDA device (interpreter timings have no speed of light))"),
    ({}, None, "meta.json records no speed of light"),
    (None, "old", "results.csv has no row_bytes column (written before it existed)"),
    (None, "interpreter", "interpreter timings: no speed of light to draw against"),
])
def test_skipped_with_the_reason(tmp_path: Path, sol, rows, reason) -> None:
    if rows == "interpreter":
        rows = with_bytes(sample_rows(interpreter=True))
    path = run_dir(tmp_path, rows=None if rows in (None, "old") else rows, sol=sol)
    if rows == "old":  # a results.csv written before the column existed
        csv_path = path / RESULTS_FILE
        with open(csv_path, newline="") as fh:
            records = list(csv.reader(fh))
        cut = list(COLUMNS).index("row_bytes")
        with open(csv_path, "w", newline="") as fh:
            csv.writer(fh).writerows(record[:cut] for record in records)
        assert "sol_pct" in csv_path.read_text() and "row_bytes" not in csv_path.read_text()
    skipped = []
    assert "roofline" not in figures(path, skipped)
    (s,) = [s for s in skipped if s.name == "roofline"]
    assert s.reason.startswith(reason), s.reason


def test_the_cli_prints_a_skipped_roofline_and_the_report_lists_it(tmp_path: Path) -> None:
    path = run_dir(tmp_path, sol={"unavailable": "calibrating failed: RuntimeError: boom"})
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("plot")(plot)
    app.command("report")(report)
    result = CliRunner().invoke(app, ["plot", str(path), "--metric", "ms"])
    assert result.exit_code == 0, result.output
    assert ("skipped roofline: no calibration in meta.json (calibrating failed: RuntimeError: "
            "boom)") in result.output
    assert not (path / "roofline.png").exists()
    result = CliRunner().invoke(app, ["report", str(path)])
    assert result.exit_code == 0, result.output
    text = (path / "report.md").read_text()
    assert ("- Roofline: no calibration in meta.json (calibrating failed: RuntimeError: boom)"
            in text)


def test_a_calibrated_run_writes_the_roofline(tmp_path: Path) -> None:
    path = run_dir(tmp_path)
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("plot")(plot)
    result = CliRunner().invoke(app, ["plot", str(path), "--metric", "ms"])
    assert result.exit_code == 0, result.output
    assert (path / "roofline.png").read_bytes()[:4] == b"\x89PNG"
    assert "skipped" not in result.output
    assert json.loads((path / "meta.json").read_text())["speed_of_light"] == CALIBRATION


@pytest.mark.parametrize("name", ["results/baselines/h100.csv",
                                  "benchmarks/results/phi3-h200-338e663.csv"])
def test_committed_results_without_the_new_columns_still_plot_report_and_gate(
        tmp_path: Path, name: str) -> None:
    from dkbench.gate.compare import run_gate
    from dkbench.report.page import render_report

    committed = Path(__file__).resolve().parents[2] / name
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RESULTS_FILE).write_bytes(committed.read_bytes())
    runs = load_runs(tmp_path / "run")
    assert "row_bytes" not in runs[0].results.columns
    skipped = []
    names = [nf.name for nf in build_figures(runs, skipped=skipped)]
    assert {"latency", "speedup", "tflops", "speedup_vs_density"} <= set(names)
    assert [s.name for s in skipped] == ["roofline"]
    assert "## Summary" in render_report(runs)
    assert run_gate(committed, committed).passed
