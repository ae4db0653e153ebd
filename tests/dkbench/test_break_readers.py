"""Hand-edited run directories under `plot`, `report` and `gate`: each exits 2 with one line
naming the file, never a traceback, or draws what the file holds."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from tests.dkbench.cli_helpers import flat, invoke
from tests.dkbench.fixtures_plot import single_run


def _rewrite(run_dir: Path, edit) -> None:
    """Replace results.csv by ``edit(header, rows)``'s (header, rows)."""
    path = run_dir / "results.csv"
    header, *rows = list(csv.reader(io.StringIO(path.read_text())))
    header, rows = edit(header, rows)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    path.write_text(text.getvalue())


def _refused(result, *phrases: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    for phrase in phrases:
        assert phrase in flat(result.stderr), result.stderr


def _commands(run_dir: Path, tmp_path: Path) -> list[list[object]]:
    return [["plot", run_dir, "--out", tmp_path / "figs"],
            ["report", run_dir, "--out", tmp_path / "rep"]]


@pytest.mark.parametrize("command", ["plot", "report", "gate"])
def test_rows_longer_than_the_header_are_refused(tmp_path: Path, command: str) -> None:
    """Was: pandas took the first column as the index, every value shifted one column left,
    and the check of the shifted cells crashed (TypeError: 'slice' and 'int')."""
    run_dir = single_run(tmp_path)
    _rewrite(run_dir, lambda header, rows: (header, [[*row, "1"] for row in rows]))
    args = {"plot": ["plot", run_dir, "--out", tmp_path / "figs"],
            "report": ["report", run_dir, "--out", tmp_path / "rep"],
            "gate": ["gate", run_dir, "--baseline", single_run(tmp_path / "base")]}[command]
    _refused(invoke(*args), f"{run_dir / 'results.csv'}: its rows have more fields than its "
             "header")


def test_a_results_csv_without_batch_still_plots(tmp_path: Path) -> None:
    """Was: KeyError 'batch' (every other shape column is optional to the figures)."""
    run_dir = single_run(tmp_path)

    def drop(header, rows):
        i = header.index("batch")
        return header[:i] + header[i + 1:], [row[:i] + row[i + 1:] for row in rows]

    _rewrite(run_dir, drop)
    for args in _commands(run_dir, tmp_path):
        result = invoke(*args)
        assert result.exit_code == 0, result.output


def test_a_meta_json_that_is_a_directory_is_named(tmp_path: Path) -> None:
    """Was: IsADirectoryError from read_meta."""
    run_dir = single_run(tmp_path)
    (run_dir / "meta.json").unlink()
    (run_dir / "meta.json").mkdir()
    for args in _commands(run_dir, tmp_path):
        _refused(invoke(*args), f"{run_dir / 'meta.json'}: cannot be read (Is a directory)")


def test_a_row_given_twice_is_refused(tmp_path: Path) -> None:
    """Was: drawn and listed twice in silence (gate and merge refuse such a file)."""
    run_dir = single_run(tmp_path)
    _rewrite(run_dir, lambda header, rows: (header, [*rows, rows[0]]))
    case_id = next(csv.DictReader(open(run_dir / "results.csv")))["case_id"]
    count = sum(1 for _ in open(run_dir / "results.csv")) - 1
    for args in _commands(run_dir, tmp_path):
        _refused(invoke(*args), f"{run_dir / 'results.csv'}: rows 1, {count} are one case and "
                 f"provider (case_id {case_id}", "allowed: one row each")


def test_a_link_beside_the_run_it_names_is_one_run(tmp_path: Path) -> None:
    from dkbench.results.runs import find_run_dirs

    run_dir = single_run(tmp_path)  # tmp_path/ls
    (tmp_path / "latest").symlink_to(run_dir.name)
    (tmp_path / "z-other").symlink_to(run_dir.name)
    # Was: three runs, the same one drawn and tabled three times.
    assert find_run_dirs(tmp_path) == [run_dir]
    result = invoke("report", tmp_path, "--out", tmp_path / "report.md")
    assert result.exit_code == 0, result.output
