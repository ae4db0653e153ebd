"""`dkbench plot`, `report` and `merge` paths a hurried user could give: an empty one (a variable
left unset), a fifo for the report, a run's own file name for it, and a crash while a report or a
figure is written over an older one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from dkbench.report.figure import NamedFigure, save_figures
from dkbench.report.page import write_report

from .cli_helpers import invoke
from .test_break_views import a_run, refused


@pytest.mark.parametrize(("command", "args", "named"), [
    ("plot", ["", "--out", "figs"], "PATH"),
    ("plot", ["{run}", "--out", ""], "--out"),
    ("report", ["", "--out", "r.md"], "PATH"),
    ("report", ["{run}", "--out", ""], "--out"),
    ("merge", ["{run}", "", "--out", "merged"], "RUN_DIR"),
    ("merge", ["{run}", "--out", ""], "--out"),
])
def test_an_empty_path_is_refused_not_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, args: list[str],
        named: str) -> None:
    # Path("") is ".": `merge ... --out "$OUT"` with OUT unset merged into the working directory,
    # `report --out ""` wrote report.md and its figures there.
    run = a_run(tmp_path / "run")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    refused(invoke(command, *(a.format(run=run) for a in args)), f"{named} '': names no path",
            "allowed:")
    assert not list(here.iterdir())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no fifos here")
def test_report_out_fifo_is_refused(tmp_path: Path) -> None:
    # Was: the report written into the fifo (blocking forever with no reader), figures beside it.
    run, fifo = a_run(tmp_path / "run"), tmp_path / "report.md"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that a write fails this, not hangs
    try:
        refused(invoke("report", run, "--out", fifo), f"--out {fifo}: is not a regular file")
    finally:
        os.close(reader)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "run"]


def test_report_out_a_runs_absent_tune_csv_is_refused(tmp_path: Path) -> None:
    # Was: the Markdown saved as the run's tune.csv, after which plot and report refused the run.
    run = a_run(tmp_path / "run")
    refused(invoke("report", run, "--out", run / "tune.csv"), "a file of a directory being "
            "reported")
    assert not (run / "tune.csv").exists()
    assert invoke("plot", run).exit_code == 0


def test_a_report_stopped_while_written_leaves_the_old_one(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run = a_run(tmp_path / "run")
    old = write_report(run).read_text(encoding="utf-8")
    # A text that cannot be encoded stops the write partway, as a crash or a full disk would.
    monkeypatch.setattr("dkbench.report.page.render_report", lambda *a, **k: "# x\n\ud800")
    with pytest.raises(UnicodeEncodeError):
        write_report(run)
    assert (run / "report.md").read_text(encoding="utf-8") == old
    assert sorted(p.name for p in run.iterdir() if p.suffix != ".png") == [
        "meta.json", "report.md", "results.csv"]


def test_a_figure_stopped_while_saved_leaves_the_old_one(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f.png").write_bytes(b"old figure")

    def torn(self, fname, **kwargs) -> None:
        Path(fname).write_bytes(b"half a fig")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", torn)
    with pytest.raises(Exception, match="No space left"):
        save_figures([NamedFigure("f", "f", Figure())], tmp_path)
    assert (tmp_path / "f.png").read_bytes() == b"old figure"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_report_out_a_link_to_a_file_of_the_run_is_refused(tmp_path: Path) -> None:
    # Was: a .md link to the run's results.csv passed the check and the Markdown replaced the rows.
    run, link = a_run(tmp_path / "run"), tmp_path / "notes.md"
    link.symlink_to(run / "results.csv")
    before = (run / "results.csv").read_bytes()
    refused(invoke("report", run, "--out", link), "a file of a directory being reported")
    assert (run / "results.csv").read_bytes() == before and link.is_symlink()


@pytest.mark.parametrize("name", ["results.csv", "meta.json", "tune.csv"])
@pytest.mark.parametrize("via", ["path", "file-link", "directory-link"])
def test_report_out_a_file_of_another_run_is_refused(tmp_path: Path, name: str, via: str) -> None:
    # Was: only the runs being reported were protected; `report R1 --out R2/results.csv`
    # replaced R2's rows with R1's Markdown (and an absent tune.csv made R2 unreadable).
    run, other = a_run(tmp_path / "run"), a_run(tmp_path / "other")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    out = {"path": other / name, "file-link": tmp_path / "notes.md",
           "directory-link": tmp_path / "linked" / name}[via]
    if via == "file-link":
        out.symlink_to(other / name)
    elif via == "directory-link":
        out.parent.symlink_to(other, target_is_directory=True)
    refused(invoke("report", run, "--out", out), f"--out {out}: is {(other / name).resolve()}, "
            f"the {name} of the run directory {other.resolve()} (it holds a meta.json)",
            "give a new file (or a .md file) for the report")
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    assert not list(tmp_path.rglob("*.png"))  # refused before any figure is drawn
    assert invoke("plot", other).exit_code == 0  # still readable


def test_report_out_a_results_csv_outside_any_run_is_still_written(tmp_path: Path) -> None:
    run, folder = a_run(tmp_path / "run"), tmp_path / "notes"
    folder.mkdir()
    assert invoke("report", run, "--out", folder / "results.csv").exit_code == 0
    assert (folder / "results.csv").read_text(encoding="utf-8").startswith("#")
