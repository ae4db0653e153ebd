"""`dkbench gate` and `dkbench merge` given inputs a demanding user could give: the same run on both
sides, a --markdown that names an input, a baseline from another GPU, a --out inside an input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dkbench.results.schema import META_FILE, RESULTS_FILE

from .cli_helpers import flat, invoke, run_dir_of
from .specs import write_spec
from .test_gate import make_run, write_run


def refused(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    text = flat(result.output)
    for word in words:
        assert word in text, text
    return text


# -- gate --

@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write_run(tmp_path / "base", make_run())


@pytest.mark.parametrize("form", ["dir", "csv", "dir/"])
def test_gate_of_a_run_against_itself_is_refused(base: Path, form: str) -> None:
    # A run compared with itself passes whatever it measured: a CI job given the same path twice
    # (a variable left unset, a copy-paste) must not read as a green gate.
    same = {"dir": base, "csv": base / RESULTS_FILE, "dir/": Path(f"{base}/")}[form]
    refused(invoke("gate", base, "--baseline", same),
            "are the same results file", str(base / RESULTS_FILE))


@pytest.mark.parametrize("target", ["current", "baseline", "meta"])
def test_gate_markdown_never_overwrites_an_input(tmp_path: Path, base: Path, target: str) -> None:
    cur = write_run(tmp_path / "cur", make_run())
    (cur / META_FILE).write_text("{}")
    md = {"current": cur / RESULTS_FILE, "baseline": base / RESULTS_FILE,
          "meta": cur / META_FILE}[target]
    before = md.read_bytes()
    refused(invoke("gate", cur, "--baseline", base, "--markdown", md),
            f"--markdown {md}:", "pick another file")
    assert md.read_bytes() == before  # the run's own file, untouched


def test_gate_speedup_across_gpus_is_noted(tmp_path: Path, base: Path) -> None:
    # A kernel's speedup over a library differs between GPU models: a pass (or a fail) against a
    # baseline from another GPU must say so, as the absolute metrics do.
    cur = write_run(tmp_path / "cur", make_run(gpu="NVIDIA A100"))
    result = invoke("gate", cur, "--baseline", base)
    assert result.exit_code == 0, result.output
    assert "speedup compared across GPUs (NVIDIA H100 vs NVIDIA A100)" in flat(result.output)


@pytest.mark.parametrize("metric", ["speedup", "tflops"])
def test_gate_tolerance_that_no_drop_can_exceed_is_refused(tmp_path: Path, base: Path,
                                                          metric: str) -> None:
    # A higher-is-better value falls by at most 100% (to 0): --tolerance 100 passed a 100x
    # slowdown with exit 0, and blamed the rows' spread for it.
    cur = write_run(tmp_path / "cur", make_run(ms={"dkernel": 100.0}))
    refused(invoke("gate", cur, "--baseline", base, "--metric", metric, "--tolerance", "100"),
            f"--tolerance 100% with --metric {metric}", "from 0 to below 100")
    # ms may rise without bound: 100% (a doubling allowed) still gates, and fails this one.
    assert invoke("gate", cur, "--baseline", base, "--metric", "ms",
                  "--tolerance", "100").exit_code == 1


# -- merge --

@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("shards")
    spec = write_spec(folder, seqlen=[32, 48])
    dirs = []
    for i in (1, 2):
        result = invoke("run", spec, "--out", folder / f"s{i}", "-q", "--shard", f"{i}/2")
        assert result.exit_code == 0, result.output
        dirs.append(run_dir_of(folder / f"s{i}"))
    return dirs


@pytest.mark.parametrize("where", ["inside", "parent", "grandparent"])
def test_merge_out_inside_or_around_an_input_is_refused(shards: list[Path], tmp_path: Path,
                                                        where: str) -> None:
    # A merged run written into a shard's run directory (or into the folder around it, making it
    # a run and a folder of runs at once) changes what that folder means to gate, plot and
    # --resume; the output must be a directory of its own.
    first = tmp_path / "out" / "first"
    shutil.copytree(shards[0], first)
    out = {"inside": first / "merged", "parent": first.parent,
           "grandparent": first.parent.parent}[where]  # was merged into, around the shards
    refused(invoke("merge", first, shards[1], "--out", out), f"--out {out}:", str(first))
    assert not (out / RESULTS_FILE).exists()
