"""`dkbench plot`: figure content through matplotlib's objects, files, bad input, the CLI."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from dkbench.commands.plot import plot, report
from dkbench.errors import BadInputError
from dkbench.report.plots import build_figures, plot_path
from dkbench.results.runs import INTERPRETER_NOTE, load_runs, load_sources
from dkbench.results.schema import RESULTS_FILE, read_results
from tests.dkbench.fixtures_plot import (
    A100,
    BASELINE,
    H100,
    JUNK,
    META,
    PATTERN,
    multi_run,
    sample_rows,
    single_run,
    write_run,
)

LABEL = f"{META['name']} ({H100})"
FAILED_LEGEND = {"failed (oom)", "failed (wrong)", "failed (unsupported)", "failed (error)"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return single_run(tmp_path_factory.mktemp("plot"))


@pytest.fixture(scope="module")
def figures(run_dir):
    return {nf.name: nf.figure for nf in build_figures(load_runs(run_dir))}


def facet(fig, mode: str):
    """The subplot of one mode (titles read '<pattern>\\n<mode> · <dtype>')."""
    (ax,) = [ax for ax in fig.axes if f"{mode} · fp16" in ax.get_title()]
    return ax


def lines(ax, gid: str) -> list:
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def series(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in lines(ax, "data")}


def legend_labels(fig) -> list[str]:
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def axes_fraction(ax, x: float, y: float) -> float:
    return ax.transAxes.inverted().transform(ax.transData.transform((x, y)))[1]


# -- figure content --

def test_latency_facets_labels_and_log_scales(figures):
    fig = figures["latency"]
    assert [ax.get_title().split("\n")[-1] for ax in fig.axes] == ["fwd · fp16", "bwd · fp16"]
    for ax in fig.axes:
        assert PATTERN in ax.get_title().replace("\n", "")
        assert ax.get_xlabel() == "sequence length (tokens)"
        assert ax.get_ylabel() == "median latency (ms)"
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"  # 1k..16k tokens, 0.06..15 ms
    assert fig.get_suptitle().startswith("Latency against sequence length")
    assert LABEL in fig.get_suptitle()
    assert INTERPRETER_NOTE not in fig.get_suptitle()


def test_latency_draws_one_series_per_provider_with_ok_points_only(figures, run_dir):
    fwd, bwd = facet(figures["latency"], "fwd"), facet(figures["latency"], "bwd")
    assert sorted(series(fwd)) == ["dkernel", "flex", "sdpa_flash"]
    assert series(fwd)["flex"][0] == [1024, 4096]  # oom at 16k
    assert sorted(series(bwd)) == ["dkernel", "sdpa_flash"]  # flex has no backward
    assert series(bwd)["dkernel"][0] == [1024, 16384]  # wrong at 4k
    df = read_results(run_dir)
    want = df[(df["provider"] == "dkernel") & (df["mode"] == "fwd")].sort_values("seqlen")["ms"]
    np.testing.assert_allclose(series(fwd)["dkernel"][1], want)
    labels = legend_labels(figures["latency"])
    assert labels[:3] == ["dkernel", "flex", "sdpa_flash"]
    assert FAILED_LEGEND <= set(labels)


@pytest.mark.parametrize("name", ["latency", "speedup", "tflops", "speedup_vs_density"])
def test_failed_rows_are_markers_at_the_bottom_never_numbers(figures, name):
    fig = figures[name]
    for ax in fig.axes:
        for line in lines(ax, "data") + lines(ax, "reference"):
            assert not set(JUNK.values()) & {float(y) for y in line.get_ydata()}, line.get_label()
    bwd = facet(fig, "bwd")
    failed = lines(bwd, "failed")
    # flex x3 (unsupported), dkernel 4k (wrong), sdpa_flash 16k (error)
    assert sum(len(line.get_xdata()) for line in failed) == 5
    assert {line.get_marker() for line in failed} == {"1", "v", "X"}
    heights = [y for line in failed for y in line.get_ydata()]
    assert max(heights) < 0.16  # axes fraction: a band at the bottom, held clear of the data
    for x, y in (p for xs, ys in series(bwd).values() for p in zip(xs, ys)):
        assert axes_fraction(bwd, x, y) > max(heights), (x, y)
    assert FAILED_LEGEND <= set(legend_labels(fig))


def test_speedup_against_the_baseline_with_a_line_at_one(figures, run_dir):
    fig = figures["speedup"]
    fwd = facet(fig, "fwd")
    assert fwd.get_ylabel() == f"speedup vs {BASELINE} (×)"
    assert BASELINE not in series(fwd)  # the baseline is the line at 1
    (one,) = lines(fwd, "reference")
    assert list(one.get_ydata()) == [1, 1] and one.get_label() == "baseline (= 1)"
    df = read_results(run_dir)
    want = df[(df["provider"] == "dkernel") & (df["mode"] == "fwd")].sort_values("seqlen")
    np.testing.assert_allclose(series(fwd)["dkernel"][1], want["speedup"])
    assert fwd.get_yscale() == "log"  # 1.1x .. 13x with the line at 1
    # dkernel bwd at 16k is ok but its baseline failed: no speedup point there
    assert series(facet(fig, "bwd"))["dkernel"][0] == [1024]


def test_tflops_with_the_baseline_dense_rate_as_reference(figures, run_dir):
    fwd = facet(figures["tflops"], "fwd")
    assert fwd.get_ylabel() == "TFLOP/s (computed pairs)"
    assert sorted(series(fwd)) == ["dkernel", "flex"]
    (ref,) = lines(fwd, "reference")
    assert ref.get_label() == f"{BASELINE} dense rate (reference)"
    df = read_results(run_dir)
    base = df[(df["provider"] == BASELINE) & (df["mode"] == "fwd")].sort_values("seqlen")
    np.testing.assert_allclose(ref.get_ydata(), base["dense_tflops"])
    assert f"{BASELINE} dense rate (reference)" in legend_labels(figures["tflops"])


def test_speedup_against_density(figures):
    fig = figures["speedup_vs_density"]
    assert [ax.get_title() for ax in fig.axes] == ["fwd · fp16", "bwd · fp16"]
    fwd = facet(fig, "fwd")
    assert fwd.get_xlabel() == "density (fraction of blocks computed)"
    assert sorted(series(fwd)) == ["dkernel", "flex"]
    assert all(line.get_linestyle() == "None" for line in lines(fwd, "data"))
    assert sorted(series(fwd)["dkernel"][0]) == [0.0625, 0.25, 0.5]
    assert {line.get_label() for line in lines(fwd, "reference")} == {"baseline (= 1)",
                                                                       "ideal (1 / density)"}


def test_tune_heatmaps_one_per_case_and_kernel_winner_outlined(figures):
    tuned = {n for n in figures if n.startswith("tune")}
    assert tuned == {"tune_ls-fwd-4096_fwd", "tune_ls-fwd-4096_bwd"}
    fig = figures["tune_ls-fwd-4096_fwd"]
    maps = {ax.get_title(): ax for ax in fig.axes if ax.images}
    assert sorted(maps) == [f"num_warps={w}, num_stages={s}" for w in (4, 8) for s in (2, 3)]
    for ax in maps.values():
        assert ax.get_xlabel() == "BLOCK_N" and ax.get_ylabel() == "BLOCK_M"
        assert [t.get_text() for t in ax.get_yticklabels()] == ["32", "64", "128"]
        assert JUNK["ms"] not in np.asarray(ax.images[0].get_array().filled(np.nan))
    oom = maps["num_warps=4, num_stages=3"].images[0].get_array()
    assert oom.mask[2, 1] and not oom.mask.sum() - 1  # BLOCK_M=128, BLOCK_N=64 failed; only it
    assert "oom" in [t.get_text() for t in maps["num_warps=4, num_stages=3"].texts]
    assert maps["num_warps=8, num_stages=2"].images[0].get_array().mask[2, 0]  # never run
    winners = [(title, p) for title, ax in maps.items() for p in ax.patches
               if p.get_gid() == "winner"]
    assert len(winners) == 1
    title, box = winners[0]
    assert title == "num_warps=8, num_stages=3"
    assert box.get_xy() == (0.5, 0.5)  # the cell of BLOCK_M=64, BLOCK_N=64
    assert "best: BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3" in fig.get_suptitle()
    assert "1.31×" in fig.get_suptitle()


def test_metric_picks_the_main_figure(run_dir):
    runs = load_runs(run_dir)
    names = [nf.name for nf in build_figures(runs, metric="tflops")]
    assert names == ["tflops", "speedup_vs_density", "tune_ls-fwd-4096_fwd", "tune_ls-fwd-4096_bwd"]


def test_comparing_runs_labels_series_by_run_and_gpu(tmp_path):
    runs = load_runs(multi_run(tmp_path))
    assert [r.label for r in runs] == [f"nightly-a100 ({A100})", f"nightly-h100 ({H100})"]
    figs = {nf.name: nf.figure for nf in build_figures(runs)}
    fwd = facet(figs["latency"], "fwd")
    assert len(lines(fwd, "data")) == 6
    assert f"dkernel · nightly-a100 ({A100})" in series(fwd)
    assert {line.get_linestyle() for line in lines(fwd, "data")} == {"-", "--"}  # one style per run
    assert len(lines(facet(figs["tflops"], "fwd"), "reference")) == 2  # a dense rate per run
    assert "runs: " in figs["latency"].get_suptitle()
    tuned = {n for n in figs if n.startswith("tune")}
    assert tuned == {"tune_h100_ls-fwd-4096_fwd", "tune_h100_ls-fwd-4096_bwd"}


def test_a_varying_shape_splits_facets_and_an_all_failed_facet_still_draws(tmp_path):
    rows = sample_rows()
    wide = [replace(r, head_dim=128, status="oom", message="too big") for r in rows]
    runs = load_runs(write_run(tmp_path / "r", rows + wide))
    fig = {nf.name: nf.figure for nf in build_figures(runs, metric="ms")}["latency"]
    titles = [ax.get_title().split("\n")[-1] for ax in fig.axes]
    assert titles == ["fwd · fp16 · d=64", "fwd · fp16 · d=128", "bwd · fp16 · d=64",
                      "bwd · fp16 · d=128"]
    (wide_fwd,) = [ax for ax in fig.axes if ax.get_title().endswith("fwd · fp16 · d=128")]
    assert not lines(wide_fwd, "data") and len(lines(wide_fwd, "failed")) == 3
    assert "no ok rows with ms" in [t.get_text() for t in wide_fwd.texts]


@pytest.mark.parametrize("name", ["latency", "tflops"])
def test_a_facet_with_no_ok_row_has_no_scale_to_read_a_failure_against(tmp_path, name):
    """Was: matplotlib's default limits around nothing, ticks from -0.04 to 0.04 ms, and the
    failure markers at the bottom beside "-0.04" as if that were their value."""
    rows = [replace(r, status="unsupported", message="needs a CUDA GPU") for r in sample_rows()]
    fig = {nf.name: nf.figure for nf in build_figures(load_runs(write_run(tmp_path / "r", rows)),
                                                      metric=name.replace("latency", "ms"))}[name]
    for ax in fig.axes:
        assert lines(ax, "failed") and not lines(ax, "data"), ax.get_title()
        assert list(ax.get_yticks()) == [] and list(ax.get_yticks(minor=True)) == []


def test_a_run_without_a_baseline_skips_the_speedup_figures_saying_why(tmp_path):
    """Was: both speedup figures drawn empty, titled against "the baseline provider" and with a
    "baseline (= 1)" line, for a spec that named no baseline."""
    rows = [replace(r, baseline="", speedup=float("nan")) for r in sample_rows()
            if r.status == "ok"]
    skipped = []
    names = [nf.name for nf in build_figures(load_runs(write_run(tmp_path / "r", rows)),
                                             skipped=skipped)]
    assert "latency" in names and "tflops" in names
    assert "speedup" not in names and "speedup_vs_density" not in names
    reasons = {s.name: s.reason for s in skipped}
    for name in ("speedup", "speedup_vs_density"):
        assert reasons[name].startswith("no baseline provider in the spec"), reasons


def test_run_name_falls_back_to_the_directory(tmp_path):
    write_run(tmp_path / "a" / "first", sample_rows())
    write_run(tmp_path / "a" / "second", sample_rows(), {"name": "same"})
    write_run(tmp_path / "a" / "third", sample_rows(), {"name": "same"})  # a clash: dir names
    labels = [r.label for r in load_runs(tmp_path / "a")]
    assert labels == [f"{n} ({H100})" for n in ("first", "second", "third")]


def test_interpreter_runs_say_so_in_every_title(tmp_path):
    runs = load_runs(single_run(tmp_path, interpreter=True))
    for nf in build_figures(runs):
        assert INTERPRETER_NOTE in nf.figure.get_suptitle(), nf.name


def test_plot_path_writes_each_format(tmp_path):
    run = write_run(tmp_path / "run", sample_rows(), META)
    written = plot_path(run, metric="ms", formats="png, svg", out=tmp_path / "figs")
    assert sorted(p.name for p in written) == ["latency.png", "latency.svg",
                                               "speedup_vs_density.png", "speedup_vs_density.svg"]
    assert all(p.parent == tmp_path / "figs" for p in written)
    assert (tmp_path / "figs" / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "figs" / "latency.svg").read_text()


# -- bad input --

def _good(p: Path) -> Path:
    return write_run(p / "r", sample_rows())


def _header_only(p: Path) -> Path:
    csv = write_run(p / "r", sample_rows()[:1]) / RESULTS_FILE
    csv.write_text(csv.read_text().splitlines()[0] + "\n")
    return p / "r"


def _missing_columns(p: Path) -> Path:
    (p / "r").mkdir()
    (p / "r" / RESULTS_FILE).write_text("provider,seqlen,ms\nx,1024,1.0\n")
    return p / "r"


def _empty(p: Path) -> Path:
    (p / "r").mkdir()
    (p / "r" / RESULTS_FILE).write_text("")
    return p / "r"


def _plain_dir(p: Path) -> Path:
    (p / "d").mkdir()
    return p / "d"


def _other_file(p: Path) -> Path:
    (p / "x.txt").write_text("")
    return p / "x.txt"


def _bad_tune(p: Path) -> Path:
    write_run(p / "r", sample_rows())
    (p / "r" / "tune.csv").write_text("case_id,kernel\nc,fwd\n")
    return p / "r"


@pytest.mark.parametrize("make, kwargs, match", [
    (lambda p: p / "nope", {}, "no such file"),
    (_plain_dir, {}, "no results.csv in it"),
    (_other_file, {}, "is a file"),
    (_empty, {}, "empty file"),
    (_header_only, {}, "no rows"),
    (_missing_columns, {}, "missing columns gpu, interpreter"),
    (_bad_tune, {}, "tune.csv: missing columns block_m"),
    (_good, {"metric": "latency"}, "unknown metric 'latency'"),
    (_good, {"formats": "png,pdf"}, "unknown figure format pdf"),
])
def test_bad_input_names_the_path_and_the_problem(tmp_path, make, kwargs, match):
    path = make(tmp_path)
    with pytest.raises(BadInputError, match=match) as info:
        plot_path(path, **kwargs)
    if "metric" not in kwargs and "formats" not in kwargs:
        assert str(tmp_path) in str(info.value)


# -- CLI --

def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("plot")(plot)
    app.command("report")(report)
    return app


def test_cli_plot_writes_figures_into_the_run_dir(tmp_path):
    run = write_run(tmp_path / "run", sample_rows(), META)
    result = CliRunner().invoke(cli(), ["plot", str(run), "--metric", "speedup"])
    assert result.exit_code == 0, result.output
    assert (run / "speedup.png").is_file() and (run / "speedup_vs_density.png").is_file()
    assert not (run / "latency.png").exists()
    assert str(run / "speedup.png") in result.output


@pytest.mark.parametrize("args, needle", [
    (["plot", "{tmp}/missing"], "missing: no such file"),
    # The flag named too (was: "unknown metric 'flops'" alone).
    (["plot", "{tmp}", "--metric", "flops"], "--metric: unknown metric 'flops'"),
    (["plot", "{tmp}", "--format", "jpg"], "--format: unknown figure format jpg"),
    (["plot", "{tmp}"], "no results.csv"),
])
def test_cli_plot_bad_input_exits_2(tmp_path, args, needle):
    result = CliRunner().invoke(cli(), [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert needle in result.output, result.output


def test_cli_plot_refuses_a_metric_for_tune_directories_only(tmp_path):
    """Was: exit 0 and the same heatmaps with or without --metric (a flag that did nothing)."""
    tuned = tune_dir(tmp_path)
    result = CliRunner().invoke(cli(), ["plot", str(tuned), "--metric", "tflops"])
    assert result.exit_code == 2, result.output
    assert "--metric tflops" in result.output and "tune directories only" in result.output
    assert not list(tuned.glob("*.png"))


def test_batch_tokens_sweep_keeps_one_line_per_provider(tmp_path):
    # batch_tokens: batch shrinks as seqlen grows; the lines must run across seqlen, not split.
    budget = 16384
    rows = [replace(r, batch=budget // r.seqlen) for r in sample_rows()]
    runs = load_runs(write_run(tmp_path / "r", rows))
    fig = {nf.name: nf.figure for nf in build_figures(runs, metric="ms")}["latency"]
    titles = [ax.get_title().split("\n")[-1] for ax in fig.axes]
    assert titles == ["fwd · fp16", "bwd · fp16"]
    xs = {len(x) for x, _ in series(facet(fig, "fwd")).values()}
    assert max(xs) == 3, xs  # a provider's ok points at all three sequence lengths on one line


# -- tune directories (`dkbench tune` writes tune.csv and meta.json, no results.csv) --

TUNE_META = {"kind": "tune", "name": "ls", "command": "dkbench tune sweeps/ls.yaml",
             "environment": {"gpu": H100, "torch": "2.11.0+cu130", "triton": "3.6.0",
                             "interpreter": False, "git_sha": "abc1234"}}


def tune_dir(parent: Path, name: str = "tune-ls-20261124", **env) -> Path:
    from tests.dkbench.fixtures_plot import tune_rows

    meta = {**TUNE_META, "environment": {**TUNE_META["environment"], **env}}
    return write_run(parent / name, [], meta, tune_rows())


def test_plot_draws_a_tune_directorys_heatmaps(tmp_path):
    tuned = tune_dir(tmp_path)
    assert not (tuned / RESULTS_FILE).exists()
    written = plot_path(tuned)
    assert sorted(p.name for p in written) == ["tune_ls-fwd-4096_bwd.png",
                                               "tune_ls-fwd-4096_fwd.png"]
    assert all(p.parent == tuned and p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_a_tune_directorys_heatmaps_name_it_and_the_interpreter(tmp_path):
    runs, tunes = load_sources(tune_dir(tmp_path, interpreter=True))
    assert runs == [] and [t.label for t in tunes] == [f"tune-ls-20261124 ({H100})"]
    figs = {nf.name: nf.figure for nf in build_figures(runs, tunes=tunes)}
    assert set(figs) == {"tune_ls-fwd-4096_fwd", "tune_ls-fwd-4096_bwd"}
    title = figs["tune_ls-fwd-4096_fwd"].get_suptitle()
    assert f"tune-ls-20261124 ({H100})" in title and INTERPRETER_NOTE in title
    assert "best: BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3" in title


def test_a_directory_of_runs_and_tunings_draws_both(tmp_path):
    write_run(tmp_path / "all" / "run", sample_rows(), META)
    tune_dir(tmp_path / "all")
    runs, tunes = load_sources(tmp_path / "all")
    names = [nf.name for nf in build_figures(runs, metric="ms", tunes=tunes)]
    assert names == ["latency", "speedup_vs_density", "tune_tune-ls-20261124_ls-fwd-4096_fwd",
                     "tune_tune-ls-20261124_ls-fwd-4096_bwd"]
    only_tunes = tmp_path / "tunes"
    tune_dir(only_tunes, "tune-a")
    tune_dir(only_tunes, "tune-b")
    assert len(plot_path(only_tunes)) == 4


def test_configs_of_two_implementations_are_never_one_cell(tmp_path):
    """Was: a gluon config and the triton one of the same tile, warps and stages shared a cell,
    which showed the median of the two (a time neither ran in) and outlined it as the winner."""
    import csv

    from tests.dkbench.fixtures_plot import TUNE_BEST, tune_rows

    fwd = [r for r in tune_rows() if r["kernel"] == "fwd"]
    triton = [{**r, "impl": "triton", "is_best": False} for r in fwd]
    gluon = [{**r, "impl": "gluon", "ms": r["ms"] / 2} for r in fwd]
    tuned = write_run(tmp_path / "tune-ls", [], TUNE_META)
    with open(tuned / "tune.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(gluon[0]))
        writer.writeheader()
        writer.writerows(triton + gluon)
    runs, tunes = load_sources(tuned)
    figs = {nf.name: nf.figure for nf in build_figures(runs, tunes=tunes)}
    assert set(figs) == {"tune_ls-fwd-4096_fwd_triton", "tune_ls-fwd-4096_fwd_gluon"}
    title = f"num_warps={TUNE_BEST[2]}, num_stages={TUNE_BEST[3]}"
    for impl, rows in (("triton", triton), ("gluon", gluon)):
        fig = figs[f"tune_ls-fwd-4096_fwd_{impl}"]
        (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
        best = next(r["ms"] for r in rows if (r["block_m"], r["block_n"], r["num_warps"],
                                               r["num_stages"]) == TUNE_BEST)
        assert ax.images[0].get_array()[1, 1] == pytest.approx(best)  # BLOCK_M=64, BLOCK_N=64
        outlined = [p for a in fig.axes for p in a.patches if p.get_gid() == "winner"]
        assert len(outlined) == (impl == "gluon"), impl  # the winner is the gluon config
        assert f"impl {impl}" in fig.get_suptitle()


def test_a_tune_directory_without_rows_is_bad_input(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "tune.csv").write_text("")
    with pytest.raises(BadInputError, match="tune.csv: no rows yet"):
        plot_path(tmp_path / "t")


def test_cli_plot_a_tune_directory(tmp_path):
    tuned = tune_dir(tmp_path)
    result = CliRunner().invoke(cli(), ["plot", str(tuned)])
    assert result.exit_code == 0, result.output
    assert "wrote 2 figure files" in result.output
    assert (tuned / "tune_ls-fwd-4096_fwd.png").is_file()
