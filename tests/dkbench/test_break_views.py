"""The readers of run directories (`gate`, `merge`, `plot`, `report`) against bad and odd input:
one error line naming the file, the row and column or key, and what is allowed (exit 2, no
traceback), and a gate that never passes without having compared a row.

Fixtures are results.csv files built from `ResultRow` (no kernel runs), then corrupted a cell at a
time.
"""

from __future__ import annotations

import io
import os
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from dkbench.commands.gate import _render
from dkbench.gate.compare import run_gate
from dkbench.report import plots
from dkbench.report.plots import build_figures
from dkbench.results.runs import load_runs
from dkbench.results.schema import RESULTS_FILE, ResultRow, rewrite_results
from tests.dkbench.cli_helpers import flat, invoke
from tests.dkbench.fixtures_plot import BASELINE, PROVIDERS, make_row, write_run

SEQLENS = (1024, 4096)  # no failed fwd rows in fixtures_plot at these lengths


def clean_rows(**changes) -> list[ResultRow]:
    """Every provider's fwd row at SEQLENS, all ok."""
    return [replace(make_row(p, "fwd", s), **changes) for s in SEQLENS for p in PROVIDERS]


def a_run(folder: Path, rows: list[ResultRow] | None = None) -> Path:
    return write_run(folder, clean_rows() if rows is None else rows, meta={"name": folder.name})


def set_cell(run_dir: Path, column: str, text: str, row: int = 0) -> Path:
    """Write ``text`` into ``column`` of data row ``row`` (0-based), as a cell's text."""
    def update(rows: list[dict[str, str]]) -> bool:
        rows[row][column] = text
        return True

    rewrite_results(run_dir / RESULTS_FILE, update)
    return run_dir


def refused(result, *words: str) -> str:
    """Exit 2, one error line holding ``words``, no traceback."""
    text = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    for word in words:
        assert word in text, result.output
    return text


# -- the gate never passes without a comparison --

def test_a_gate_of_only_the_against_providers_rows_is_no_verdict(tmp_path: Path) -> None:
    base = a_run(tmp_path / "base")
    cur = a_run(tmp_path / "cur", [r for r in clean_rows() if r.provider == BASELINE])
    result = run_gate(cur, base)
    assert not result.passed and result.nothing_compared
    md = tmp_path / "gate.md"
    text = refused(invoke("gate", cur, "--baseline", base, "--markdown", md),
                   "NO VERDICT: 0 compared",
                   "no row was compared on speedup vs sdpa_flash, so the gate cannot pass",
                   "2 rows of sdpa_flash itself", "4 rows on one side only")
    assert "PASS" not in text
    assert md.read_text(encoding="utf-8").startswith("### dkbench gate: NO VERDICT")


def test_the_against_provider_alone_under_providers_is_no_verdict(tmp_path: Path) -> None:
    base, cur = a_run(tmp_path / "base"), a_run(tmp_path / "cur")
    refused(invoke("gate", cur, "--baseline", base, "--providers", BASELINE),
            "no row was compared", "pick another with --against")


def test_a_baseline_whose_rows_all_failed_is_no_verdict(tmp_path: Path) -> None:
    base = a_run(tmp_path / "base", clean_rows(status="error", message="boom"))
    cur = a_run(tmp_path / "cur")
    refused(invoke("gate", cur, "--baseline", base), "6 rows skipped",
            "baseline error, current ok")


def test_rows_all_throttled_are_no_verdict_not_a_pass(tmp_path: Path) -> None:
    base = a_run(tmp_path / "base", clean_rows(clock_mhz_median=1800.0))
    rows = [replace(r, clock_mhz_median=1300.0 if r.provider == "dkernel" else 1800.0)
            for r in clean_rows()]
    cur = a_run(tmp_path / "cur", rows)
    refused(invoke("gate", cur, "--baseline", base, "--providers", "dkernel"),
            "2 rows skipped (2 throttled: rerun them on a steady GPU)")


def test_rows_of_another_case_under_the_same_key_are_not_compared(tmp_path: Path) -> None:
    base = a_run(tmp_path / "base")
    cur = a_run(tmp_path / "cur", [replace(r, case_id=r.case_id + "x") for r in clean_rows()])
    refused(invoke("gate", cur, "--baseline", base), "not the same case: case_id ls-fwd-1024 in "
            "baseline, ls-fwd-1024x in current", "length_spread")


def test_a_failed_row_with_nothing_compared_still_fails(tmp_path: Path) -> None:
    base = a_run(tmp_path / "base")
    cur = a_run(tmp_path / "cur", clean_rows(status="oom", message="out of memory"))
    result = invoke("gate", cur, "--baseline", base)
    assert result.exit_code == 1, result.output
    assert "FAIL: 0 compared" in flat(result.output), result.output


# -- gate flags --

@pytest.mark.parametrize("args, words", [
    (["--providers", ","], ["--providers ','", "names no provider"]),
    (["--providers", ""], ["--providers ''", "names no provider"]),
    (["--metric", "ms", "--against", "dkernel"], ["--against dkernel: applies to --metric "
                                                  "speedup only"]),
    # Was: an empty --against fell back to the rows' baseline column, without a word.
    (["--against", ""], ["--against '': names no provider"]),
])
def test_gate_flags_that_would_do_nothing_are_refused(tmp_path: Path, args, words) -> None:
    base, cur = a_run(tmp_path / "base"), a_run(tmp_path / "cur")
    refused(invoke("gate", cur, "--baseline", base, *args), *words)


def test_a_markdown_that_cannot_be_written_is_refused_before_the_table(tmp_path: Path) -> None:
    base, cur = a_run(tmp_path / "base"), a_run(tmp_path / "cur")
    text = refused(invoke("gate", cur, "--baseline", base, "--markdown", tmp_path),
                   "--markdown", "is a directory")
    assert "PASS" not in text
    refused(invoke("gate", cur, "--baseline", base, "--markdown", tmp_path / "no" / "gate.md"),
            "its directory", "does not exist")


def test_a_directory_of_runs_is_named_as_such(tmp_path: Path) -> None:
    a_run(tmp_path / "runs" / "one")
    a_run(tmp_path / "runs" / "two")
    refused(invoke("gate", tmp_path / "runs", "--baseline", tmp_path / "runs" / "one"),
            "holds 2 run directories (one, two)", "give one of them")


# -- bad cells: every reader names the file, the row, the column and what is allowed --

BAD_CELLS = [
    ("ms", "fast", "column ms holds 'fast'; allowed: a number, or empty"),
    ("ms", "-1", "column ms holds -1; allowed: in a row with status ok, a finite number above 0"),
    ("ms", "inf", "column ms holds inf"),
    ("ms", "", "column ms is empty"),
    ("ms_p20", "x", "column ms_p20 holds 'x'"),
    ("speedup", "0", "column speedup holds 0"),
    ("speedup", "fast", "column speedup holds 'fast'"),
    ("status", "bogus", "column status holds 'bogus'; allowed: ok, oom, unsupported, error, wrong"),
    ("seqlen", "abc", "column seqlen holds 'abc'; allowed: a whole number of at least 1"),
    ("batch", "0", "column batch holds 0; allowed: a whole number of at least 1"),
    ("heads", "8.5", "column heads holds 8.5"),
    ("causal", "maybe", "column causal holds 'maybe'; allowed: True or False"),
    ("clock_mhz_median", "fast", "column clock_mhz_median holds 'fast'"),
]


@pytest.mark.parametrize("column, text, words", BAD_CELLS)
@pytest.mark.parametrize("side", ["current", "baseline"])
def test_gate_names_a_bad_cell(tmp_path: Path, column, text, words, side) -> None:
    good, bad = a_run(tmp_path / "good"), set_cell(a_run(tmp_path / "bad"), column, text)
    args = (bad, "--baseline", good) if side == "current" else (good, "--baseline", bad)
    refused(invoke("gate", *args), f"{side} {bad / RESULTS_FILE}: row 1 (case_id ls-fwd-1024, "
            "provider dkernel)", words)


@pytest.mark.parametrize("column, text, words", BAD_CELLS[:2] + BAD_CELLS[7:9])
@pytest.mark.parametrize("command", ["plot", "report"])
def test_plot_and_report_name_a_bad_cell(tmp_path: Path, column, text, words, command) -> None:
    bad = set_cell(a_run(tmp_path / "bad"), column, text)
    refused(invoke(command, bad), f"{bad / RESULTS_FILE}: row 1", words)


def test_a_failed_rows_missing_numbers_are_fine(tmp_path: Path) -> None:
    rows = clean_rows()
    rows[0] = replace(rows[0], status="oom", ms=float("nan"), speedup=float("nan"),
                      tflops=float("nan"))
    assert len(load_runs(a_run(tmp_path / "run", rows))[0].results) == len(rows)


# -- merge --

def shard(folder: Path, rows: list[ResultRow], **meta) -> Path:
    return write_run(folder, rows, meta={"kind": "run", "spec_name": "s", "spec": {},
                                         "environment": {"gpu": "g"}, **meta})


def test_merge_of_a_meta_json_list_is_refused(tmp_path: Path) -> None:
    run = shard(tmp_path / "a", clean_rows())
    (run / "meta.json").write_text("[1, 2]")
    refused(invoke("merge", run, "--out", tmp_path / "out"),
            f"{run / 'meta.json'}: holds a JSON list, not the object `dkbench run` writes")


def test_merge_of_a_meta_json_with_an_environment_of_the_wrong_type(tmp_path: Path) -> None:
    run = shard(tmp_path / "a", clean_rows(), environment="h100")
    refused(invoke("merge", run, "--out", tmp_path / "out"),
            "key 'environment' holds \"h100\"; allowed: null or an object")


@pytest.mark.parametrize("providers", [3, True])
def test_merge_of_a_meta_json_with_providers_of_another_type(tmp_path: Path, providers) -> None:
    # Was: a TypeError traceback ("'int' object is not iterable").
    run = shard(tmp_path / "a", clean_rows(), providers=providers)
    refused(invoke("merge", run, "--out", tmp_path / "out"),
            f"key 'providers' holds {str(providers).lower()}; allowed: null or a list")
    assert not (tmp_path / "out").exists()


def test_merge_of_a_results_csv_without_a_column_its_readers_need(tmp_path: Path) -> None:
    # Was: merged as it was, into a run that plot, gate, report and --resume all refuse.
    run = shard(tmp_path / "a", clean_rows())
    path = run / RESULTS_FILE
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.drop(columns="status").to_csv(path, index=False)
    refused(invoke("merge", run, "--out", tmp_path / "out"),
            f"{path}: its header lacks the column status")
    assert not (tmp_path / "out").exists()


def test_merge_reads_past_a_byte_order_mark(tmp_path: Path) -> None:
    rows = clean_rows()
    one, two = shard(tmp_path / "one", rows[:3]), shard(tmp_path / "two", rows[3:])
    csv = two / RESULTS_FILE
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())  # saved by an editor
    result = invoke("merge", one, two, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    header = (tmp_path / "out" / RESULTS_FILE).read_bytes().split(b"\r\n")[0]
    assert header.startswith(b"run_id,"), header


def test_merge_of_nothing_but_empty_results_is_refused(tmp_path: Path) -> None:
    run = shard(tmp_path / "a", [])
    (run / RESULTS_FILE).write_bytes(b"")  # a run cut off while writing its first row
    refused(invoke("merge", run, "--out", tmp_path / "out"), "nothing to merge")
    assert not (tmp_path / "out" / RESULTS_FILE).exists()


def test_merge_names_a_bad_cell(tmp_path: Path) -> None:
    run = set_cell(shard(tmp_path / "a", clean_rows()), "ms", "fast", row=2)
    refused(invoke("merge", run, "--out", tmp_path / "out"),
            f"{run / RESULTS_FILE}: row 3 (case_id ls-fwd-1024, provider sdpa_flash): column ms "
            "holds 'fast'")


def test_merge_says_what_a_path_is_instead_of_a_run(tmp_path: Path) -> None:
    refused(invoke("merge", tmp_path / "nope", "--out", tmp_path / "out"), "no such directory")
    shard(tmp_path / "runs" / "one", clean_rows())
    refused(invoke("merge", tmp_path / "runs", "--out", tmp_path / "out"),
            "holds 1 run directory (one); give each of them as a RUN_DIR")


# -- plot and report outputs --

def test_plot_out_that_is_a_file_is_refused_before_drawing(tmp_path: Path) -> None:
    run, file = a_run(tmp_path / "run"), tmp_path / "notes.txt"
    file.write_text("x")
    refused(invoke("plot", run, "--out", file), f"--out {file}: is a file, not a directory")
    refused(invoke("plot", run, "--out", file / "figs"), f"{file} is a file, not a directory")


def test_report_out_inside_a_file_is_refused(tmp_path: Path) -> None:
    run, file = a_run(tmp_path / "run"), tmp_path / "notes.txt"
    file.write_text("x")
    refused(invoke("report", run, "--out", file / "r.md"),
            f"--out {file / 'r.md'}: {file} is a file, not a directory")


@pytest.mark.parametrize("name", [RESULTS_FILE, "meta.json"])
def test_report_out_that_is_a_file_of_the_run_is_refused(tmp_path: Path, name: str) -> None:
    # Was: the run's results.csv (or meta.json) replaced by the report's Markdown.
    run = a_run(tmp_path / "run")
    before = (run / name).read_bytes()
    refused(invoke("report", run, "--out", run / name), f"--out {run / name}: is",
            "a file of a directory being reported")
    assert (run / name).read_bytes() == before
    assert invoke("report", run, "--out", run / "notes.md").exit_code == 0


@pytest.mark.parametrize("command", ["plot", "report"])
@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_plot_and_report_of_a_device_or_fifo_are_refused(tmp_path: Path, command: str,
                                                         kind: str) -> None:
    # Was: a NotADirectoryError traceback from listing it as a folder.
    path = Path("/dev/null")
    if kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
    refused(invoke(command, path), f"{path}: not a regular file or a directory")


def test_report_out_a_new_path_without_a_suffix_is_a_directory(tmp_path: Path) -> None:
    run = a_run(tmp_path / "run")
    result = invoke("report", run, "--out", tmp_path / "pages")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pages" / "report.md").is_file()


def test_many_facets_are_split_over_several_figures(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(plots, "FACETS_PER_FIGURE", 2)
    rows = [replace(make_row(p, "fwd", 1024), heads=h, case_id=f"c{h}")
            for h in (1, 2, 4) for p in PROVIDERS]
    figures = build_figures(load_runs(a_run(tmp_path / "run", rows)), metric="ms")
    names = [nf.name for nf in figures]
    assert names[:4] == ["latency_1", "latency_2", "speedup_vs_density_1",
                         "speedup_vs_density_2"], names
    assert [len(nf.figure.axes) for nf in figures[:2]] == [2, 1]
    assert figures[1].title == "Latency against sequence length (2 of 2)"


def test_a_row_missing_a_shape_value_keeps_its_facet(tmp_path: Path) -> None:
    rows = [replace(make_row(p, "fwd", 1024), heads=h, case_id=f"c{h}")
            for h in (1, 2) for p in PROVIDERS]
    run = a_run(tmp_path / "run", rows)
    set_cell(run, "heads", "", row=0)
    (figure,) = [nf.figure for nf in build_figures(load_runs(run), metric="ms")
                 if nf.name == "latency"]
    assert len(figure.axes) == 3  # heads 1, 2 and the row without heads



# -- the gate's table as printed --

def test_a_provider_or_message_with_brackets_prints_as_text(tmp_path: Path) -> None:
    rows = [replace(r, provider="x[/y]") if r.provider == "flex" else r for r in clean_rows()]
    base = a_run(tmp_path / "base", rows)
    rows[1] = replace(rows[1], status="error", message="shape [/bold] mismatch")
    result = invoke("gate", a_run(tmp_path / "cur", rows), "--baseline", base)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "MarkupError" not in result.output
    assert "x[/y]" in result.output and "shape [/bold] mismatch" in flat(result.output)


def test_a_stdout_that_cannot_encode_the_table_still_gets_it(tmp_path: Path) -> None:
    rows = [replace(r, provider="dkérnel") if r.provider == "dkernel" else r
            for r in clean_rows()]
    run = a_run(tmp_path / "run", rows)
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")  # as under PYTHONIOENCODING=ascii
    _render(run_gate(run, run), Console(file=out, width=200))
    out.flush()
    text = raw.getvalue().decode("ascii")
    assert "+-" in text and "dk\\xe9rnel" in text and "PASS: 4 compared" in text, text


def test_a_spread_too_wide_to_fail_is_noted(tmp_path: Path) -> None:
    rows = [replace(r, speedup_p20=r.speedup * 0.1, speedup_p80=r.speedup * 1.2)
            if r.provider == "dkernel" else r for r in clean_rows()]
    run = a_run(tmp_path / "run", rows)
    result = run_gate(run, run)
    assert result.passed
    assert any("2 rows passed with a p20-p80 spread so wide (threshold 110% or more)" in note
               for note in result.notes), result.notes


@pytest.mark.parametrize("value, words", [
    (3, "key 'shard' holds 3; allowed: null or a string"),
    ("two of four", "key 'shard' holds 'two of four'; allowed: I/N"),
])
def test_merge_of_a_meta_json_with_a_bad_shard(tmp_path: Path, value, words) -> None:
    rows = clean_rows()
    one = shard(tmp_path / "one", rows[:3], shard="1/2")
    two = shard(tmp_path / "two", rows[3:], shard=value)
    refused(invoke("merge", one, two, "--out", tmp_path / "out"), words)


def test_merge_of_a_meta_json_with_started_of_another_type(tmp_path: Path) -> None:
    rows = clean_rows()
    one = shard(tmp_path / "one", rows[:3], started="2026-01-01T00:00:00")
    two = shard(tmp_path / "two", rows[3:], started=5)
    refused(invoke("merge", one, two, "--out", tmp_path / "out"),
            "key 'started' holds 5; allowed: null or a string")


@pytest.mark.parametrize("command", ["gate", "plot"])
def test_a_header_naming_a_column_twice_is_refused(tmp_path: Path, command) -> None:
    run = a_run(tmp_path / "run")
    csv = run / RESULTS_FILE
    lines = csv.read_text().splitlines(keepends=True)
    # a second ms column appended to every line: pandas would read it as "ms.1"
    csv.write_text("".join(line.rstrip("\r\n") + (",ms\n" if i == 0 else ",99\n")
                           for i, line in enumerate(lines)))
    args = (run, "--baseline", run) if command == "gate" else (run,)
    refused(invoke(command, *args), f"{csv}: column ms appears more than once in its header")


@pytest.mark.parametrize("column, value, words", [
    ("ms", -1.0, "column ms holds -1; allowed: in a row with status ok, a finite number above 0"),
    ("block_m", "big", "column block_m holds 'big'; allowed: a whole number of at least 1"),
    ("status", "bogus", "allowed: ok, oom, unsupported, error, wrong, screened"),
])
def test_a_bad_cell_of_tune_csv_is_named(tmp_path: Path, column, value, words) -> None:
    from tests.dkbench.fixtures_plot import tune_rows

    rows = tune_rows()
    for row in rows:
        row[column] = value
    run = write_run(tmp_path / "run", clean_rows(), meta={"name": "run"}, tune=rows)
    refused(invoke("report", run), f"{run / 'tune.csv'}: row 1 (case_id ls-fwd-4096)", words)


@pytest.mark.parametrize("command", ["gate", "plot", "report"])
def test_a_csv_the_parser_refuses_is_named_on_one_line(tmp_path: Path, command: str) -> None:
    # pandas ends its parser's message with a newline; quoted as it was, the error took two lines.
    run = shard(tmp_path / "a", clean_rows())
    with (run / RESULTS_FILE).open("a") as csv:
        csv.write("1,2,3" + ",x" * 200 + "\n")
    args = {"gate": [run, "--baseline", run]}
    result = invoke(command, *args.get(command, [run]))
    refused(result, "not a readable", "CSV (Error tokenizing data")
    (line,) = [text for text in result.output.splitlines() if "not a readable" in text]
    assert line.rstrip().endswith(")"), result.output
