"""What plots and reports show: provenance text exactly as written, and legends that say which
provider failed and why."""

from __future__ import annotations

from dataclasses import replace

from dkbench.report.page import render_report, write_report
from dkbench.report.plots import build_figures
from dkbench.results.runs import load_runs
from tests.dkbench.fixtures_plot import (
    A100,
    META,
    multi_run,
    sample_rows,
    tune_rows,
    write_run,
)

SHA = "338e663124"  # a float to pandas (338 x 10^663124: inf)


def legend_labels(fig) -> list[str]:
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def legend_handles(fig) -> dict:
    (legend,) = fig.legends
    return dict(zip(legend_labels(fig), legend.legend_handles))


def figures(runs, metric: str | None = "ms") -> dict:
    return {nf.name: nf.figure for nf in build_figures(runs, metric=metric)}


# -- provenance as text --

def test_a_sha_of_digits_and_an_e_stays_text(tmp_path):
    rows = [replace(r, git_sha=SHA, run_id="0123", torch_version="2.10") for r in sample_rows()]
    run_dir = write_run(tmp_path / "r", rows, META)
    (run,) = load_runs(run_dir)
    assert set(run.results["git_sha"]) == {SHA}
    assert set(run.results["run_id"]) == {"0123"}  # not the integer 123
    assert set(run.results["torch_version"]) == {"2.10"}  # not the float 2.1
    env = write_report(run_dir).read_text().split("## Summary")[0]
    assert f"| csv `git_sha` | {SHA} |" in env, env
    assert "| csv `run_id` | 0123 |" in env and "| csv `torch_version` | 2.10 |" in env, env
    assert "inf" not in env


def test_a_numeric_looking_case_id_stays_text(tmp_path):
    rows = [replace(r, case_id=SHA if r.case_id == "ls-fwd-1024" else r.case_id)
            for r in sample_rows()]
    tune = [{**t, "case_id": "1234567890"} for t in tune_rows()]
    (run,) = load_runs(write_run(tmp_path / "r", rows, META, tune))
    assert f"`{SHA}`: seqlen 1024" in render_report([run])
    names = {nf.name for nf in build_figures([run], metric="ms")}
    assert {"tune_1234567890_fwd", "tune_1234567890_bwd"} <= names, names


# -- legends name failed providers --

def test_latency_legend_counts_each_providers_failed_rows(tmp_path):
    fig = figures(load_runs(write_run(tmp_path / "r", sample_rows(), META)))["latency"]
    labels = legend_labels(fig)
    # flex: oom at 16k forward, unsupported at every backward; dkernel wrong once; sdpa_flash error.
    for entry in ("flex (4 of 6 failed)", "dkernel (1 of 6 failed)",
                  "sdpa_flash (1 of 6 failed)"):
        assert entry in labels, labels
    series = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()
              if line.get_gid() == "data"}
    handle = legend_handles(fig)["flex (4 of 6 failed)"]
    assert handle.get_color() == series["flex"].get_color()
    assert handle.get_marker() == "1"  # its commonest failure: unsupported


def test_a_provider_that_never_ran_says_why(tmp_path):
    rows = [replace(r, status="unsupported", message="FlexAttention needs a CUDA GPU")
            if r.provider == "flex" else r for r in sample_rows()]
    rows = [r for r in rows if not (r.provider == "dkernel" and r.status != "ok")]
    fig = figures(load_runs(write_run(tmp_path / "r", rows, META)))["latency"]
    labels = legend_labels(fig)
    assert "flex (unsupported: FlexAttention needs a CUDA GPU)" in labels, labels
    assert "flex" not in labels  # no series: it has no ok point
    assert "dkernel" in labels and not [t for t in labels if t.startswith("dkernel (")], labels


def test_a_long_reason_is_cut_short(tmp_path):
    message = ("RuntimeError: CUDA error: an illegal memory access was encountered while "
               "launching the kernel\nsecond line")
    rows = [replace(r, status="error", message=message) if r.provider == "flex" else r
            for r in sample_rows()]
    labels = legend_labels(figures(load_runs(write_run(tmp_path / "r", rows, META)))["latency"])
    (entry,) = [t for t in labels if t.startswith("flex (")]
    assert entry.startswith("flex (error: RuntimeError: CUDA error: an illegal")
    assert entry.endswith("…)") and len(entry) <= len("flex (error: )") + 44, entry
    assert "second line" not in entry


def test_mixed_failures_of_a_provider_with_no_ok_row(tmp_path):
    rows = [replace(r, status="unsupported" if r.mode == "bwd" else "oom", message="no")
            if r.provider == "flex" else r for r in sample_rows()]
    labels = legend_labels(figures(load_runs(write_run(tmp_path / "r", rows, META)))["latency"])
    assert [t for t in labels if t.startswith("flex (")] == ["flex (all 6 failed; oom: no)"]


def test_every_view_and_each_run_of_a_comparison(tmp_path):
    figs = figures(load_runs(multi_run(tmp_path)), metric=None)
    for name in ("latency", "speedup", "tflops", "speedup_vs_density"):
        labels = legend_labels(figs[name])
        assert f"flex · nightly-a100 ({A100}) (4 of 6 failed)" in labels, (name, labels)
