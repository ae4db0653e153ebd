"""The break-even density: the interpolation against hand-computed cases, the density sweep read
from results (dense providers told from their rows), the report's table and the figure."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dkbench.names import BUNDLED_PROVIDER
from dkbench.report.breakeven import ALWAYS, CROSSES, NEVER, break_even
from dkbench.report.density import dense_providers, density_facets
from dkbench.report.page import render_report
from dkbench.report.plots import build_figures
from dkbench.results.runs import load_runs
from dkbench.results.schema import ResultRow
from tests.dkbench.fixtures_plot import write_run

# -- the interpolation --


def test_crossing_between_two_points_is_interpolated() -> None:
    # 3.0 ms at 0.2, 5.0 ms at 0.4; dense 4.0 ms is half-way: 0.3.
    got = break_even([(0.1, 2.0), (0.2, 3.0), (0.4, 5.0), (0.8, 9.0)], 4.0)
    assert got.verdict == CROSSES and got.density == pytest.approx(0.3)
    # a quarter of the way: 3.5 ms between 3.0 and 5.0 -> 0.2 + 0.25 * 0.2
    assert break_even([(0.2, 3.0), (0.4, 5.0)], 3.5).density == pytest.approx(0.25)
    assert (got.lowest, got.highest) == (0.1, 0.8)
    assert got.text() == "0.3"


def test_an_exact_hit_is_that_density() -> None:
    assert break_even([(0.1, 2.0), (0.3, 4.0), (0.5, 6.0)], 4.0).density == 0.3
    # a tie at the lowest density: it breaks even right there
    got = break_even([(0.1, 4.0), (0.3, 6.0)], 4.0)
    assert (got.verdict, got.density) == (CROSSES, 0.1)


def test_always_and_never_say_so() -> None:
    always = break_even([(0.05, 1.0), (0.5, 2.0), (0.9, 3.0)], 10.0)
    assert (always.verdict, always.density) == (ALWAYS, None)
    assert always.text() == "always (faster at every measured density, up to 0.9)"
    never = break_even([(0.05, 11.0), (0.9, 30.0)], 10.0)
    assert (never.verdict, never.density) == (NEVER, None)
    assert never.text() == "never (slower at every measured density, from 0.05)"


def test_unsorted_points_and_repeats_are_sorted_and_taken_at_their_median() -> None:
    # Sorted: 0.2 -> median(3, 3, 100) = 3, 0.4 -> 5; crossing 4.0 at 0.3.
    points = [(0.4, 5.0), (0.2, 100.0), (0.8, 9.0), (0.2, 3.0), (0.1, 2.0), (0.2, 3.0)]
    assert break_even(points, 4.0).density == pytest.approx(0.3)


def test_the_first_crossing_from_below_is_reported() -> None:
    # faster up to 0.3, slower at 0.5, faster again at 0.7 (noise): the first crossing counts.
    got = break_even([(0.1, 1.0), (0.3, 3.0), (0.5, 7.0), (0.7, 3.0)], 5.0)
    assert got.density == pytest.approx(0.4)


def test_no_points_or_no_dense_time_is_an_error() -> None:
    with pytest.raises(ValueError):
        break_even([], 1.0)
    with pytest.raises(ValueError):
        break_even([(0.1, 1.0)], float("nan"))


# -- the sweep read from results --

DENSITIES = (0.1, 0.3, 0.5, 0.9)
SEQLENS = (4096, 8192)


def ours_ms(density: float, seqlen: int) -> float:
    return (0.5 + 10 * density) * seqlen / 4096  # 1.5, 3.5, 5.5, 9.5 ms at 4k


DENSE_MS = {"sdpa_cudnn": 4.5, "fa4": 6.0}  # at 4k; fastest: cudnn -> break-even 0.4 at 4k


def row(provider: str, density: float, seqlen: int, ms: float, status: str = "ok") -> ResultRow:
    dense_flops = 1e12 * seqlen / 4096
    flops = dense_flops * (density if provider in (BUNDLED_PROVIDER, "flex") else 1.0)
    return ResultRow(
        run_id="r", timestamp="2026-12-01T00:00:00", gpu="NVIDIA H200", torch_version="2.11",
        triton_version="3.6", git_sha="abc", interpreter=False,
        case_id=f"c{seqlen}-{density}", provider=provider, mode="fwd", dtype="bfloat16", batch=1,
        seqlen=seqlen, q_len=seqlen, heads=32, kv_heads=8, head_dim=128, causal=True,
        pattern=f"random(bs64,d{density},seed0)", pattern_hash="h", block_size=64,
        density=density, seed=0, timer="interleaved", ms=ms, ms_p20=ms, ms_p80=ms, flops=flops,
        tflops=flops / (ms * 1e-3) / 1e12, dense_tflops=dense_flops / (ms * 1e-3) / 1e12,
        baseline="sdpa_cudnn", status=status)


def sweep_rows(dense: dict[str, float] | None = None) -> list[ResultRow]:
    dense = DENSE_MS if dense is None else dense
    rows = []
    for seqlen in SEQLENS:
        for d in DENSITIES:
            rows.append(row(BUNDLED_PROVIDER, d, seqlen, ours_ms(d, seqlen)))
            rows.append(row("flex", d, seqlen, 2 * ours_ms(d, seqlen)))  # sparse, never dense
            rows += [row(p, d, seqlen, ms * seqlen / 4096) for p, ms in dense.items()]
    return rows


def facets_of(tmp_path: Path, rows: list[ResultRow]):
    (run,) = load_runs(write_run(tmp_path / "run", rows))
    return run, density_facets(run.results)


def test_dense_providers_are_told_from_their_rows(tmp_path: Path) -> None:
    run, _ = facets_of(tmp_path, sweep_rows())
    assert dense_providers(run.results) == {"sdpa_cudnn", "fa4"}


def test_one_facet_per_seqlen_against_the_fastest_dense_provider(tmp_path: Path) -> None:
    _, facets = facets_of(tmp_path, sweep_rows())
    assert [f.key["seqlen"] for f in facets] == list(SEQLENS)
    for facet in facets:
        assert facet.dense_provider == "sdpa_cudnn"
        scale = facet.key["seqlen"] / 4096
        assert facet.dense_ms == pytest.approx(4.5 * scale)
        assert facet.ours == [(d, pytest.approx(ours_ms(d, facet.key["seqlen"])))
                              for d in DENSITIES]
        # 3.5 ms at 0.3 and 5.5 at 0.5 (both scaled alike): 4.5 is half-way, 0.4
        assert facet.result.density == pytest.approx(0.4)


def test_a_failed_dense_row_leaves_the_next_fastest(tmp_path: Path) -> None:
    rows = [replace(r, status="error", ms=0.001) if r.provider == "sdpa_cudnn" else r
            for r in sweep_rows()]
    _, facets = facets_of(tmp_path, rows)
    # fa4 at 6.0 ms (4k): between 5.5 at 0.5 and 9.5 at 0.9: 0.5 + 0.5/4 * 0.4 = 0.55
    assert {f.dense_provider for f in facets} == {"fa4"}
    assert facets[0].result.density == pytest.approx(0.55)


def test_missing_dense_rows_give_no_break_even(tmp_path: Path) -> None:
    run, facets = facets_of(tmp_path, sweep_rows(dense={}))
    assert len(facets) == 2 and all(f.dense_ms is None and f.result is None for f in facets)
    text = render_report([run])
    assert "no dense provider ran ok" in text
    skipped = []
    names = [nf.name for nf in build_figures([run], skipped=skipped)]
    assert "breakeven" not in names
    assert [(s.name, s.reason) for s in skipped if s.name == "breakeven"] == [
        ("breakeven", "no dense provider ran ok beside the density sweep: nothing to break even "
                      "with")]


def test_no_density_axis_no_facets(tmp_path: Path) -> None:
    rows = [r for r in sweep_rows() if r.density == 0.3]
    run, facets = facets_of(tmp_path, rows)
    assert facets == []
    assert "Break-even density" not in render_report([run])


# -- the report and the figure --

def test_the_report_tables_the_break_even_per_seqlen(tmp_path: Path) -> None:
    rows = sweep_rows()
    # at 8k, ours is faster everywhere: the dense time is far above
    rows = [replace(r, ms=100.0) if r.seqlen == 8192 and r.provider in DENSE_MS else r
            for r in rows]
    run, _ = facets_of(tmp_path, rows)
    lines = render_report([run]).splitlines()
    start = lines.index("## Break-even density")
    table = [line for line in lines[start:] if line.startswith("| 4096") or
             line.startswith("| 8192")]
    assert table == [
        "| 4096 | fwd | bfloat16 | 0.4 | sdpa_cudnn | 4.5 | 0.1, 0.3, 0.5, 0.9 |",
        "| 8192 | fwd | bfloat16 | always (faster at every measured density, up to 0.9) | "
        "fa4 | 100 | 0.1, 0.3, 0.5, 0.9 |",
    ]


def test_the_figure_draws_ours_the_dense_line_and_the_crossing(tmp_path: Path) -> None:
    run, _ = facets_of(tmp_path, sweep_rows())
    figures = {nf.name: nf.figure for nf in build_figures([run], metric="ms")}
    fig = figures["breakeven"]
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert ax.get_title() == "fwd · bfloat16 · seqlen 4k\nbreak-even: 0.4"
    (ours,) = [line for line in ax.get_lines() if line.get_gid() == "ours"]
    assert list(ours.get_xdata()) == list(DENSITIES)
    assert list(ours.get_ydata()) == pytest.approx([ours_ms(d, 4096) for d in DENSITIES])
    (dense,) = [line for line in ax.get_lines() if line.get_gid() == "dense"]
    assert list(dense.get_ydata()) == [4.5, 4.5] and "sdpa_cudnn" in dense.get_label()
    (cross,) = [line for line in ax.get_lines() if line.get_gid() == "break-even"]
    assert list(cross.get_xdata()) == pytest.approx([0.4, 0.4])
    assert fig.axes[1].get_title().endswith("break-even: 0.4")  # 8k: both scale alike
