"""What `dkbench report`, `dkbench plot` and the run's console summary show, against what
results.csv holds: text from the file shown as the text it is (never Markdown, HTML, rich markup or
matplotlib math), numbers that never read the same where the CSV differs, and rows a figure cannot
draw named rather than dropped.

Run directories are built from `ResultRow` (no kernel runs); the Markdown is rendered with
markdown-it (CommonMark and GFM tables, as GitHub reads them) and compared cell by cell.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from matplotlib.colors import to_rgb
from rich.console import Console

from dkbench.report.page import render_report, write_report
from dkbench.report.plots import build_figures, save_figures
from dkbench.report.summary import summary_table
from dkbench.results.runs import load_runs
from dkbench.results.schema import RESULTS_FILE, rewrite_results
from tests.dkbench.cli_helpers import invoke
from tests.dkbench.fixtures_plot import BASELINE, make_row, tune_rows, write_run

SEQLENS = (1024, 4096)


def rows_of(providers=("dkernel", "flex", BASELINE), **changes):
    return [replace(make_row(p, "fwd", s), **changes) for s in SEQLENS for p in providers]


class _Html(HTMLParser):
    """The tables (rows of cell texts) and the headings (level, text) of rendered Markdown."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.headings: list[tuple[str, str]] = []
        self.tags: list[str] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th", "h1", "h2", "h3"):
            self._text = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._text))
            self._text = None
        elif tag in ("h1", "h2", "h3"):
            self.headings.append((tag, "".join(self._text)))
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_comment(self, data):
        self.tags.append("<!--")


def rendered(markdown: str) -> _Html:
    html = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)
    parser = _Html()
    parser.feed(html)
    return parser


def table_with(page: _Html, header0: str, header1: str) -> list[list[str]]:
    return next(t for t in page.tables if t[0][:2] == [header0, header1])


# -- text from the file is text in the report --

MESSAGE = ("shape <!-- hidden --> mismatch | see\n`x` <b>bold</b> *star* [link](http://x) "
           "$a$ ~~gone~~ &lt; back\\slash [bold]x[/]")
PROVIDER = "fl|ex`<i>*x*"
PATTERN = "file(a`b|c.npy,bs64)"


def test_names_and_messages_render_as_their_text(tmp_path: Path) -> None:
    rows = [replace(r, provider=PROVIDER) if r.provider == "flex" else r
            for r in rows_of(pattern=PATTERN)]
    rows[0] = replace(rows[0], status="error", message=MESSAGE)
    run = write_run(tmp_path / "run", rows, meta={"name": "nightly <!-- x --> *run*"})
    page = rendered(write_report(run).read_text(encoding="utf-8"))
    assert "<!--" not in page.tags and "b" not in page.tags and "em" not in page.tags
    assert ("h1", "dkbench report: nightly <!-- x --> *run* (NVIDIA H100 80GB HBM3)") in (
        page.headings)
    assert ("h3", f"{PATTERN} · fwd · fp16") in page.headings
    failed = table_with(page, "case_id", "provider")
    assert all(len(row) == 7 for row in failed)
    assert failed[1][1] == "dkernel" and failed[1][6] == " ".join(MESSAGE.split())
    summary = table_with(page, "provider", "median ms (p20–p80)")
    assert all(len(row) == 6 for row in summary)
    assert [row[0] for row in summary[1:]] == ["dkernel", f"{PROVIDER} ★", "sdpa_flash"]


def test_a_code_span_in_a_table_keeps_its_pipes() -> None:
    from dkbench.report.markdown import code, table

    page = rendered("\n".join(table(["a", "b"], [[code("x|y``z", in_table=True), "w"]])))
    assert page.tables[0][1] == ["x|y``z", "w"]


def test_a_figure_link_survives_spaces_and_brackets(tmp_path: Path) -> None:
    (run,) = load_runs(write_run(tmp_path / "run", rows_of(), meta={"name": "r"}))
    figure = tmp_path / "my figs (v2)" / "latency.png"
    text = render_report([run], [("Latency [v2]", figure)], tmp_path)
    assert "![Latency \\[v2\\]](my%20figs%20%28v2%29/latency.png)" in text, text


# -- numbers as the CSV holds them --

def _report_rows(tmp_path: Path, rows) -> dict[str, list[str]]:
    run = write_run(tmp_path / "run", rows, meta={"name": "r"})
    page = rendered(render_report(load_runs(run)))
    table = table_with(page, "provider", "median ms (p20–p80)")
    return {row[0]: row[1:] for row in table[1:]}


def test_two_times_that_differ_never_read_the_same(tmp_path: Path) -> None:
    rows = [r for r in rows_of() if r.seqlen == 1024]
    rows = [replace(r, ms=2.77441, speedup=1.00041) if r.provider == "dkernel" else
            replace(r, ms=2.77449, speedup=1.00012) if r.provider == "flex" else
            replace(r, ms=2.7755) for r in rows]
    table = _report_rows(tmp_path, rows)
    assert table["dkernel ★"][0].startswith("2.7744 (")
    assert table["flex"][0].startswith("2.7745 (")
    assert table["dkernel ★"][3] == "1.0004×" and table["flex"][3] == "1.0001×"


def test_a_tie_stars_every_fastest_row(tmp_path: Path) -> None:
    rows = [replace(r, ms=0.01) if r.provider != BASELINE else r
            for r in rows_of() if r.seqlen == 1024]
    assert {"dkernel ★", "flex ★"} <= set(_report_rows(tmp_path, rows))


def test_small_rates_and_speedups_keep_their_digits(tmp_path: Path) -> None:
    rows = [replace(r, tflops=5.4e-05, dense_tflops=6.1e-05, speedup=0.0021)
            if r.provider == "dkernel" else r for r in rows_of() if r.seqlen == 1024]
    table = _report_rows(tmp_path, rows)
    assert table["dkernel ★"][1:4] == ["5.4e-05", "6.1e-05", "0.0021×"], table


def test_shape_values_read_as_written(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", rows_of(), meta={"name": "r"})

    def clear(rows):  # one empty heads cell makes the column float: 8.0
        rows[-1]["heads"] = ""
        return True

    rewrite_results(run / RESULTS_FILE, clear)
    text = render_report(load_runs(run))
    assert "heads 8, " in text and "heads 8.0" not in text


# -- the console summary --

def _console(rows, baseline=BASELINE) -> str:
    console = Console(width=250, record=True)
    console.print(summary_table(rows, baseline))
    return console.export_text()


@pytest.mark.parametrize("pattern", ["file([/]x.npy,bs64)", "file([bold]x[/bold].npy,bs64)"])
def test_the_console_summary_prints_names_as_text(pattern: str) -> None:
    rows = [replace(r, provider="[red]fl") if r.provider == "flex" else r
            for r in rows_of(pattern=pattern)]
    text = _console(rows, baseline="[b]" + BASELINE)
    assert pattern in text and "[red]fl" in text and f"vs [b]{BASELINE}" in text, text


def test_the_console_summary_tells_small_times_apart() -> None:
    rows = [r for r in rows_of() if r.seqlen == 1024]
    rows = [replace(r, ms=0.01212) if r.provider == "dkernel" else
            replace(r, ms=0.01241) if r.provider == "flex" else replace(r, ms=0.0004)
            for r in rows]
    text = _console(rows)
    assert "0.01212 " in text and "0.01241 " in text and "*0.00040" in text, text


# -- figures --

def test_a_dollar_in_a_name_or_message_is_not_math(tmp_path: Path) -> None:
    rows = [replace(r, provider="fl$x_1$") if r.provider == "flex" else
            replace(r, status="error", message="needs $\\frac$ here") if r.provider == "dkernel"
            else r for r in rows_of()]
    figures = build_figures(load_runs(write_run(tmp_path / "run", rows, meta={"name": "$r$"})),
                            metric="ms")
    save_figures(figures, tmp_path / "out")  # drawing parsed "$\frac$" as math, and failed
    labels = [t.get_text() for t in figures[0].figure.legends[0].get_texts()]
    assert "fl$x_1$" in labels and "dkernel (error: needs $\\frac$ here)" in labels, labels


def test_more_than_ten_providers_get_different_colours(tmp_path: Path) -> None:
    providers = [BASELINE, *(f"p{i:02d}" for i in range(11))]
    run = write_run(tmp_path / "run", rows_of(providers), meta={"name": "r"})
    (latency, *_) = build_figures(load_runs(run), metric="ms")
    colours = {line.get_label(): to_rgb(line.get_color())
               for ax in latency.figure.axes for line in ax.get_lines() if line.get_gid() == "data"}
    assert len(colours) == 12 and len(set(colours.values())) == 12, colours


def _legend(figures, name: str) -> list[str]:
    (fig,) = [nf.figure for nf in figures if nf.name == name]
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_ok_rows_a_figure_cannot_draw_are_named(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", rows_of(), meta={"name": "r"})

    def edit(rows):  # ok rows: dkernel without a speedup, flex without a sequence length
        rows[0]["speedup"] = ""
        rows[1]["seqlen"] = ""
        return True

    rewrite_results(run / RESULTS_FILE, edit)
    figures = build_figures(load_runs(run))
    assert "dkernel (1 ok row without speedup: not drawn)" in _legend(figures, "speedup")
    assert "flex (1 ok row without seqlen: not drawn)" in _legend(figures, "latency")
    assert not [t for t in _legend(figures, "latency") if t.startswith("dkernel (")]


def test_a_density_of_zero_still_draws(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", rows_of(density=0.0), meta={"name": "r"})
    result = invoke("plot", run, "--metric", "ms")
    assert result.exit_code == 0, result.output
    assert (run / "speedup_vs_density.png").is_file()


def test_case_ids_that_slug_alike_are_saved_apart(tmp_path: Path) -> None:
    tune = [*({**t, "case_id": "a/b"} for t in tune_rows()),
            *({**t, "case_id": "a_b"} for t in tune_rows() if t["kernel"] == "fwd")]
    run = write_run(tmp_path / "run", rows_of(), meta={"name": "r"}, tune=tune)
    figures = build_figures(load_runs(run), metric="ms")
    names = [nf.name for nf in figures if nf.name.startswith("tune")]
    assert names == ["tune_a_b_fwd", "tune_a_b_bwd", "tune_a_b_fwd_2"], names
    text = write_report(run).read_text(encoding="utf-8")
    for name in names:
        assert f"]({name}.png)" in text and (run / f"{name}.png").is_file()
    with open(run / "tune.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(tune)


def test_an_ok_rows_message_is_in_the_report(tmp_path: Path) -> None:
    note = "throttled (clock 1650 MHz, run median 1841 MHz)"
    rows = [replace(r, message=note) if r.provider == "dkernel" and r.seqlen == 1024 else r
            for r in rows_of()]
    page = rendered(render_report(load_runs(write_run(tmp_path / "run", rows,
                                                      meta={"name": "r"}))))
    assert ("h2", "Notes on ok rows") in page.headings
    (notes,) = [t for t in page.tables if t[0][-1] == "message" and "status" not in t[0]]
    assert notes[1:] == [["ls-fwd-1024", "dkernel", "fwd", "fp16", "1024", note]], notes


def test_a_bad_cell_in_a_row_whose_provider_holds_a_newline_is_one_line(tmp_path: Path) -> None:
    rows = [replace(r, provider="fl\nex") if r.provider == "dkernel" else r for r in rows_of()]
    run = write_run(tmp_path / "run", rows, meta={"name": "r"})

    def edit(rows):
        rows[0]["ms"] = "fast"
        return True

    rewrite_results(run / RESULTS_FILE, edit)
    result = invoke("report", run)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "row 1 (case_id ls-fwd-1024, provider 'fl\\nex'): column ms holds 'fast'" in (
        result.output.replace("\n", "")), result.output


def test_the_gates_markdown_escapes_names_and_notes_outside_its_table() -> None:
    from dkbench.gate.compare import GateResult, OneSided
    from dkbench.gate.render import to_markdown

    result = GateResult("ms", None, 0.05, [], [OneSided("fwd <!-- x", "fl|ex*", "current", "ok")],
                        notes=["pattern `a|b` <b>bold</b>"])
    text = to_markdown(result)
    assert "- fwd \\<!-- x / fl\\|ex\\*: only in current (ok)" in text, text
    assert "> pattern \\`a\\|b\\` \\<b>bold\\</b>" in text, text
    assert "<!--" not in text.replace("\\<!--", "")
