"""`dkbench report`: the Markdown page's environment, tables, failures and figure links; the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dkbench.commands.plot import plot, report
from dkbench.errors import BadInputError
from dkbench.report.page import render_report, write_report
from dkbench.results.runs import INTERPRETER_NOTE, load_runs
from dkbench.results.schema import read_results
from tests.dkbench.fixtures_plot import (
    A100,
    FAILURES,
    H100,
    JUNK,
    META,
    multi_run,
    sample_rows,
    single_run,
    write_run,
)

IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return single_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def text(run_dir) -> str:
    path = write_report(run_dir)
    assert path == run_dir / "report.md"
    return path.read_text()


def section(text: str, heading: str) -> str:
    """The text from `heading` to the next heading of the same level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    end = text.find("\n" + level + " ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def table_rows(block: str) -> dict[str, list[str]]:
    """The first Markdown table in `block`, as provider cell -> the other cells."""
    rows = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in rows[1:]]
    return {c[0]: c[1:] for c in cells}


def case_block(text: str, case_id: str) -> str:
    start = text.index(f"`{case_id}`:")
    return text[start:text.index("\n\n", text.index("| provider", start))]


def test_environment_from_meta_and_csv(text):
    env = section(text, "## Environment")
    for value in (H100, "2.11.0+cu130", "3.6.0", "3.12.3", META["spec"], META["command"],
                  "abc1234", "do_bench", "run1"):
        assert value in env, value
    assert "18 (ok 12" in env
    assert INTERPRETER_NOTE not in text


def test_summary_table_per_case_with_the_winner_marked(text, run_dir):
    rows = table_rows(case_block(text, "ls-fwd-4096"))
    assert list(rows) == ["**dkernel** ★", "flex", "sdpa_flash"]
    df = read_results(run_dir)
    ms = df[(df["case_id"] == "ls-fwd-4096") & (df["provider"] == "dkernel")]["ms"].item()
    assert rows["**dkernel** ★"][0].startswith(f"{ms:.4g} (")
    assert rows["**dkernel** ★"][3] == "3.33×" and rows["**dkernel** ★"][4] == "ok"
    assert rows["sdpa_flash"][3] == "baseline"
    assert "### `local_stride(local=4,vert=2)` · fwd · fp16" in text


def test_failed_rows_show_no_numbers_and_lose_the_win(text):
    rows = table_rows(case_block(text, "ls-bwd-4096"))
    assert rows["dkernel"] == ["—", "—", "—", "—", "wrong"]
    assert "**sdpa_flash** ★" in rows
    for junk in JUNK.values():
        assert f"{junk:g}" not in section(text, "## Summary")


def test_failed_rows_listed_with_their_messages(text):
    failed = section(text, "## Failed rows")
    for (provider, mode, seqlen), (status, message) in FAILURES.items():
        line = next(ln for ln in failed.splitlines() if f"ls-{mode}-{seqlen} | {provider} |" in ln)
        assert f"| {status} | {message.replace('|', chr(92) + '|')} |" in line


def test_figures_linked_by_relative_path(text, run_dir):
    links = IMAGE.findall(section(text, "## Figures"))
    assert {"latency.png", "speedup.png", "tflops.png", "speedup_vs_density.png",
            "tune_ls-fwd-4096_fwd.png", "tune_ls-fwd-4096_bwd.png"} == set(links)
    assert all((run_dir / link).is_file() for link in links)


def test_interpreter_runs_carry_the_note(tmp_path):
    text = render_report(load_runs(single_run(tmp_path, interpreter=True)))
    assert INTERPRETER_NOTE in text.split("## Environment")[0]


def test_comparing_runs(tmp_path):
    text = render_report(load_runs(multi_run(tmp_path)))
    assert text.startswith("# dkbench report: 2 runs compared")
    header = section(text, "## Environment").splitlines()[2]
    assert f"nightly-a100 ({A100})" in header and f"nightly-h100 ({H100})" in header
    assert f"## Summary: nightly-a100 ({A100})" in text
    assert f"## Summary: nightly-h100 ({H100})" in text
    assert section(text, "## Failed rows").splitlines()[2].startswith("| run | case_id |")


def test_bad_input_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        write_report(tmp_path / "nope")


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("plot")(plot)
    app.command("report")(report)
    return app


def test_cli_report_out_elsewhere_links_relative_to_it(tmp_path):
    run = write_run(tmp_path / "run", sample_rows(), META)
    out = tmp_path / "site" / "bench.md"
    result = CliRunner().invoke(cli(), ["report", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    links = IMAGE.findall(out.read_text())
    assert links
    assert all(not Path(link).is_absolute() and (out.parent / link).is_file() for link in links)


def test_cli_report_bad_input_exits_2(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv").write_text("")
    result = CliRunner().invoke(cli(), ["report", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "results.csv: empty file" in result.output, result.output


def test_environment_comes_from_the_runners_meta(tmp_path):
    # The runner nests versions under meta.json's "environment".
    from dkbench.report.page import render_report

    meta = {"name": "nested", "environment": {"gpu": "GPU-X", "torch": "9.9", "triton": "8.8",
                                              "python": "3.99"}}
    runs = load_runs(write_run(tmp_path / "r", sample_rows(), meta))
    text = render_report(runs)
    for want in ("| GPU | GPU-X |", "| torch | 9.9 |", "| triton | 8.8 |", "| python | 3.99 |"):
        assert want in text, want


def test_a_paired_speedup_shows_the_band_of_its_ratios():
    """Timed interleaved, a speedup carries the p20-p80 of its per-round ratios; an older row
    (no such columns filled) shows the speedup alone."""
    import pandas as pd

    from dkbench.report.page import case_table

    common = dict(status="ok", baseline="sdpa_cudnn", ms_p20=1.0, ms_p80=1.2, tflops=1.0,
                  dense_tflops=1.0)
    frame = pd.DataFrame([
        dict(common, provider="sdpa_cudnn", ms=4.0, speedup=1.0, speedup_p20=float("nan"),
             speedup_p80=float("nan")),
        dict(common, provider="dkbench", ms=1.5, speedup=2.54, speedup_p20=2.5, speedup_p80=2.58),
        dict(common, provider="flex", ms=3.0, speedup=1.3, speedup_p20=float("nan"),
             speedup_p80=float("nan")),
    ])
    rows = table_rows("\n".join(case_table(frame)))
    assert rows["**dkbench** ★"][3] == "2.54× (2.50–2.58)"
    assert rows["flex"][3] == "1.30×" and rows["sdpa_cudnn"][3] == "baseline"


# -- tune directories --

def test_report_of_a_tune_directory(tmp_path):
    from tests.dkbench.fixtures_plot import tune_rows

    meta = {"kind": "tune", "name": "ls", "command": "dkbench tune sweeps/ls.yaml",
            "environment": {"gpu": H100, "torch": "2.11.0+cu130", "git_sha": "abc1234"}}
    tuned = write_run(tmp_path / "tune-ls-1", [], meta, tune_rows())
    result = CliRunner().invoke(cli(), ["report", str(tuned)])
    assert result.exit_code == 0, result.output
    text = (tuned / "report.md").read_text()
    assert text.startswith(f"# dkbench report: tune-ls-1 ({H100})")
    env = section(text, "## Environment")
    for want in (f"| GPU | {H100} |", "| torch | 2.11.0+cu130 |", "| csv `git_sha` | abc1234 |",
                 "| rows (by status) | 46 (ok 44, oom 2) |"):
        assert want in env, env
    assert "## Summary" not in text and "## Failed rows" not in text
    tuning = [line for line in section(text, "## Tuning").splitlines() if line.startswith("| ls")]
    # 24 configs per kernel, one pruned (no row), one oom; the winner 1.31x over the default.
    assert tuning[0] == ("| ls-fwd-4096 | fwd | 22 of 23 | BLOCK_M=64, BLOCK_N=64, num_warps=8, "
                         "num_stages=3 | 0.2 | 1.31× |")
    assert tuning[1].startswith("| ls-fwd-4096 | bwd | 22 of 23 |")
    links = IMAGE.findall(section(text, "## Figures"))
    assert set(links) == {"tune_ls-fwd-4096_fwd.png", "tune_ls-fwd-4096_bwd.png"}
    assert all((tuned / link).is_file() for link in links)


def test_a_kept_default_is_not_called_the_fastest_config(tmp_path):
    """Was: the Tuning table's "fastest config" column (and the heatmap's "red outline: fastest
    config") named the default that tune kept, beside configs with lower medians."""
    from tests.dkbench.fixtures_plot import tune_rows

    default = (32, 32, 4, 2)
    rows = [{**r, "is_best": (r["block_m"], r["block_n"], r["num_warps"], r["num_stages"])
             == default, "speedup_vs_default": 1.0} for r in tune_rows()]
    tuned = write_run(tmp_path / "tune-ls-1", [], {"kind": "tune", "name": "ls"}, rows)
    write_report(tuned)
    tuning = section((tuned / "report.md").read_text(), "## Tuning")
    assert "fastest" not in tuning
    assert "| case_id | kernel | configs ok | chosen config | median ms | vs default |" in tuning
    assert "| ls-fwd-4096 | fwd | 22 of 23 | BLOCK_M=32, BLOCK_N=32, num_warps=4, " in tuning


def test_a_run_with_a_tune_csv_reports_its_tuning(text):
    rows = [line for line in section(text, "## Tuning").splitlines() if line.startswith("| ls-")]
    assert [line.split(" | ")[1] for line in rows] == ["fwd", "bwd"]  # pipeline order
