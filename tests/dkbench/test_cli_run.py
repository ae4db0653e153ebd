"""`dkbench run`, `validate` and `env` through Typer's CliRunner on the real app."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import Result

from dkbench.commands.run import default_spec
from dkbench.errors import BadInputError
from dkbench.measure import runner
from dkbench.measure.providers.bundled import BundledKernel
from dkbench.results.schema import COLUMNS, RESULTS_FILE, ResultRow, read_meta, read_results

from .cli_helpers import flat, invoke, pairs, run_dir_of
from .specs import needs_interpreter, write_spec

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
PREPARE_ONE = runner.prepare_one
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")






# -- the smoke sweep end to end --

@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("smoke")
    result = invoke("run", SWEEPS / "smoke.yaml", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    return result, run_dir_of(out)


@needs_interpreter
def test_smoke_rows(smoke: tuple[Result, Path]) -> None:
    _, run_dir = smoke
    frame = read_results(run_dir)
    assert tuple(frame.columns) == COLUMNS
    # Only providers that run on a CPU: the first run on a machine without a GPU ends clean.
    assert sorted(zip(frame["seqlen"], frame["provider"], frame["status"])) == [
        (128, "dkbench", "ok"), (128, "sdpa_math", "ok"),
        (192, "dkbench", "ok"), (192, "sdpa_math", "ok")]
    assert frame["provider"].tolist()[::2] == ["sdpa_math", "sdpa_math"]  # baseline first
    assert set(frame["interpreter"]) == {True}
    assert set(frame["run_id"]) == {run_dir.name}
    assert set(frame["gpu"]) == {"cpu (triton interpreter)"}
    assert set(frame["baseline"]) == {"sdpa_math"}


@needs_interpreter
def test_smoke_ok_rows_have_finite_numbers(smoke: tuple[Result, Path]) -> None:
    frame = read_results(smoke[1])
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == 4
    assert set(ok["timer"]) == {"interpreter-wallclock"}
    for col in ("ms", "ms_p20", "ms_p80", "build_ms", "setup_ms", "flops", "tflops",
                "dense_tflops", "speedup", "max_abs_err", "rel_err", "density"):
        assert all(math.isfinite(v) and v >= 0 for v in ok[col]), (col, ok[col].tolist())
    assert (ok["ms_p20"] <= ok["ms"]).all() and (ok["ms"] <= ok["ms_p80"]).all()
    assert (ok["rel_err"] < 5e-3).all()
    base = ok[ok["provider"] == "sdpa_math"]
    assert base["speedup"].tolist() == [1.0, 1.0]
    mine = ok[ok["provider"] == "dkbench"].set_index("seqlen")
    base = base.set_index("seqlen")
    assert base["speedup_p20"].isna().all() and base["speedup_p80"].isna().all()
    for seqlen in (128, 192):
        # Timed interleaved: the speedup is the median of per-round ratios, inside their p20-p80.
        assert 0 < mine.loc[seqlen, "speedup_p20"] <= mine.loc[seqlen, "speedup"] <= mine.loc[
            seqlen, "speedup_p80"]
        assert mine.loc[seqlen, "sparsity_efficiency"] == pytest.approx(
            mine.loc[seqlen, "speedup"] * mine.loc[seqlen, "density"])
        assert 0 < mine.loc[seqlen, "density"] < 1
        # Sparse rows are credited with the kept pairs, dense rows with all causal pairs.
        assert mine.loc[seqlen, "flops"] == pytest.approx(
            base.loc[seqlen, "flops"] * mine.loc[seqlen, "density"])


@needs_interpreter
def test_smoke_output_and_meta(smoke: tuple[Result, Path]) -> None:
    result, run_dir = smoke
    out = flat(result.stdout)
    assert f"Run directory: {run_dir} (2 cases x 2 providers on cpu)" in out, result.output
    assert "did not run ok" not in out and "skipped" not in out, result.output
    assert "ms (speedup vs sdpa_math); * = fastest" in out, result.output
    assert f"Results: {run_dir / RESULTS_FILE}" in out, result.output
    spent = re.search(r"Wall time (\d+) s: set-up \(prepare, check, warm-up\) (\d+) s, most in "
                      r"(\w+) \d+ s, (\w+) \d+ s; timing and the rest (\d+) s\.", out)
    assert spent, result.output
    assert int(spent[2]) <= int(spent[1]) and {spent[3], spent[4]} == {"dkbench", "sdpa_math"}
    meta = read_meta(run_dir)
    assert meta["spec_name"] == "smoke" and meta["baseline"] == "sdpa_math"
    assert meta["providers"] == ["dkbench", "sdpa_math"]
    assert meta["spec_text"] == (SWEEPS / "smoke.yaml").read_text()
    assert meta["environment"]["interpreter"] is True and "finished" in meta


# -- failed rows still exit 0 --

def test_failed_rows_exit_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, *args, **kwargs):
        raise ValueError("no launch config fits")

    monkeypatch.setattr(BundledKernel, "prepare", broken)
    spec = write_spec(tmp_path, providers=["dkbench", "sdpa_math"])
    result = invoke("run", spec, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert "1 of 2 rows did not run ok" in flat(result.stdout), result.output
    frame = read_results(run_dir_of(tmp_path / "out"))
    by_provider = frame.set_index("provider")
    assert by_provider["status"].to_dict() == {"dkbench": "error", "sdpa_math": "ok"}
    assert by_provider.loc["dkbench", "message"] == "ValueError: no launch config fits"


# -- resume --

def four_cases(tmp_path: Path, **overrides) -> Path:
    return write_spec(tmp_path, seqlen=[32, 48], heads=[2, 4], **overrides)


def record_calls(monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> list:
    calls: list[tuple[str, str]] = []

    def prepare_one(ctx, case, name, *args):
        if interrupt_at is not None and len(calls) + 1 == interrupt_at:
            raise KeyboardInterrupt
        calls.append((case.case_id, name))
        return PREPARE_ONE(ctx, case, name, *args)

    monkeypatch.setattr(runner, "prepare_one", prepare_one)
    return calls


def test_resume_after_interrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, out = four_cases(tmp_path), tmp_path / "out"
    first = record_calls(monkeypatch, interrupt_at=3)
    result = invoke("run", spec, "--out", out, "-q")
    assert result.exit_code == 130, result.output
    run_dir = run_dir_of(out)
    assert f"--resume {run_dir}" in flat(result.stderr), result.output
    assert pairs(run_dir) == first and len(first) == 2
    assert "finished" not in read_meta(run_dir)

    second = record_calls(monkeypatch)
    result = invoke("run", spec, "--out", out, "-q", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert len(second) == 2 and not set(second) & set(first)
    assert pairs(run_dir) == first + second
    assert len(set(pairs(run_dir))) == 4
    assert run_dir_of(out) == run_dir  # no second run directory
    assert "finished" in read_meta(run_dir)


def test_resume_reruns_only_missing_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, out = four_cases(tmp_path), tmp_path / "out"
    result = invoke("run", spec, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    run_dir = run_dir_of(out)
    csv = run_dir / RESULTS_FILE
    header, *lines = csv.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    everything = pairs(run_dir)
    csv.write_text(header + lines[0] + lines[2])  # as if rows 2 and 4 were never written

    calls = record_calls(monkeypatch)
    result = invoke("run", spec, "--out", out, "-q", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert calls == [everything[1], everything[3]]
    assert sorted(pairs(run_dir)) == sorted(everything)

    calls.clear()  # a finished run resumes to nothing
    result = invoke("run", spec, "--out", out, "-q", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert calls == [] and len(pairs(run_dir)) == 4


@needs_interpreter
def test_resume_adds_providers_with_speedups(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, heads=[2, 4], providers=["sdpa_math", "dkbench"],
                      baseline="sdpa_math")
    out = tmp_path / "out"
    result = invoke("run", spec, "--out", out, "-q", "--providers", "sdpa_math")
    assert result.exit_code == 0, result.output
    run_dir = run_dir_of(out)
    assert set(read_results(run_dir)["provider"]) == {"sdpa_math"}

    result = invoke("run", spec, "--out", out, "-q", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    frame = read_results(run_dir)
    assert frame["provider"].tolist() == ["sdpa_math", "sdpa_math", "dkbench", "dkbench"]
    assert len(set(zip(frame["case_id"], frame["provider"]))) == 4
    base = frame[frame["provider"] == "sdpa_math"].set_index("case_id")["ms"]
    mine = frame[frame["provider"] == "dkbench"].set_index("case_id")
    assert (mine["status"] == "ok").all(), mine["message"].tolist()
    for case_id, row in mine.iterrows():
        assert row["speedup"] == pytest.approx(base[case_id] / row["ms"])  # baseline from run 1


def test_resume_keeps_an_older_files_columns(tmp_path: Path) -> None:
    spec, out = four_cases(tmp_path), tmp_path / "out"
    assert invoke("run", spec, "--out", out, "-q").exit_code == 0
    run_dir = run_dir_of(out)
    frame = read_results(run_dir)
    old = [c for c in COLUMNS if c not in ("speedup_p20", "speedup_p80")]
    frame[old].head(2).to_csv(run_dir / RESULTS_FILE, index=False)  # as written before them

    result = invoke("run", spec, "--out", out, "-q", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    again = read_results(run_dir)
    assert list(again.columns) == old and len(again) == 4
    assert (again["status"] == "ok").all() and (again["ms"] > 0).all(), again.tail(2).T
    assert set(again["timer"]) == {"interpreter-wallclock"}


def test_resume_rejects_other_directories(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("run", spec, "--resume", empty, "-q")
    assert result.exit_code == 2, result.output
    assert f"--resume {empty}: not a run directory" in flat(result.stderr), result.output

    other = write_spec(tmp_path, "other.yaml", name="other")
    result = invoke("run", other, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    run_dir = run_dir_of(tmp_path / "out")
    result = invoke("run", spec, "--resume", run_dir, "-q")
    assert result.exit_code == 2, result.output
    assert "that run is of spec 'other', not 'tiny'" in flat(result.stderr), result.output


# -- --only and --providers --

def test_only_filters_cases(tmp_path: Path) -> None:
    spec, out = four_cases(tmp_path), tmp_path / "out"
    result = invoke("run", spec, "--out", out, "-q", "--only", "seqlen=48", "--only", "heads=2,4")
    assert result.exit_code == 0, result.output
    assert "(2 cases x 1 providers on cpu)" in flat(result.stdout), result.output
    frame = read_results(run_dir_of(out))
    assert sorted(zip(frame["seqlen"], frame["heads"])) == [(48, 2), (48, 4)]


@pytest.mark.parametrize(("only", "message"), [
    ("colour=red", "--only 'colour=red': expected KEY=VALUE with KEY one of mode, dtype"),
    ("seqlen", "--only 'seqlen': expected KEY=VALUE"),
    ("seqlen=4096", "--only seqlen=4096: no case of"),
])
def test_only_bad_input(tmp_path: Path, only: str, message: str) -> None:
    out = tmp_path / "out"
    result = invoke("run", four_cases(tmp_path), "--out", out, "-q", "--only", only)
    assert result.exit_code == 2, result.output
    assert message in flat(result.stderr), result.output
    assert not out.exists()  # nothing ran, no run directory


def test_providers_flag_replaces_the_spec_list(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("run", write_spec(tmp_path), "--out", out, "-q",
                    "--providers", "sdpa_flash, sdpa_math")
    assert result.exit_code == 0, result.output
    frame = read_results(run_dir_of(out))
    assert frame.set_index("provider")["status"].to_dict() == {
        "sdpa_flash": "unsupported", "sdpa_math": "ok"}


# -- bad input exits 2 --

@pytest.mark.parametrize(("args", "message"), [
    (["--providers", "sdpa_math,cutlass"], "--providers: unknown cutlass; allowed: dkbench,"),
    (["--device", "gpu"], "--device 'gpu': allowed values are auto, cuda, cpu"),
])
def test_bad_flags_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke("run", write_spec(tmp_path), "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in flat(result.stderr), result.output


def test_bad_spec_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, heads=3, kv_heads=2)
    for command in ("run", "validate"):
        result = invoke(command, spec, "--out", tmp_path / "out") if command == "run" else \
            invoke(command, spec)
        assert result.exit_code == 2, result.output
        assert f"error: {spec}: kv_heads: heads=3 is not divisible by kv_heads=2" in flat(
            result.stderr), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_missing_spec_exits_2(tmp_path: Path) -> None:
    result = invoke("run", tmp_path / "absent.yaml", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'absent.yaml'}: no such spec file" in flat(result.stderr), result.output


@NO_GPU
def test_cuda_without_gpu_exits_2(tmp_path: Path) -> None:
    result = invoke("run", write_spec(tmp_path), "--device", "cuda", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "--device cuda: no CUDA GPU is visible" in flat(result.stderr), result.output
    result = invoke("run", write_spec(tmp_path, device="cuda"), "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output  # the spec's device counts under --device auto
    assert "no CUDA GPU is visible" in flat(result.stderr), result.output


def test_default_spec_by_device() -> None:
    assert default_spec(torch.device("cpu")).name == "smoke.yaml"
    assert default_spec(torch.device("cuda", 0)).name == "phi3.yaml"


def test_an_install_from_a_wheel_finds_the_default_spec_it_ships(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of a checkout, the default is the copy pyproject's data-files install."""
    from dkbench.commands import run as run_command

    assert run_command.INSTALLED_SWEEPS_DIR == Path(sys.prefix) / "share" / "dkbench" / "sweeps"
    installed = tmp_path / "prefix" / "share" / "dkbench" / "sweeps"
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"share/dkbench/sweeps" = ["sweeps/*.yaml"]' in pyproject
    installed.mkdir(parents=True)
    (installed / "smoke.yaml").write_text("name: smoke\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_command, "SWEEPS_DIR", tmp_path / "no-checkout")
    monkeypatch.setattr(run_command, "INSTALLED_SWEEPS_DIR", installed)
    assert default_spec(torch.device("cpu")) == installed / "smoke.yaml"
    with pytest.raises(BadInputError, match="built-in default sweeps/phi3.yaml was not found"):
        default_spec(torch.device("cuda", 0))


# -- validate --

def test_validate_prints_the_count(tmp_path: Path) -> None:
    spec = four_cases(tmp_path, providers=["sdpa_math", "dkbench"])
    result = invoke("validate", spec)
    assert result.exit_code == 0, result.output
    assert flat(result.stdout) == f"{spec}: ok, 4 cases x 2 providers = 8 rows (after exclusions)"


@pytest.mark.parametrize(("name", "count"), [
    ("smoke.yaml", "2 cases x 2 providers = 4 rows"),
    ("phi3.yaml", "8 cases x 11 providers"),
    ("phi3-heads.yaml", "8 cases x 3 providers = 24 rows"),
    ("patterns.yaml", "12 cases x 5 providers = 60 rows"),
    # Graph rows beside the eager ones: 87 eager rows, 69 graph rows (none for the slow dense
    # references, as the run makes them).
    ("decode.yaml", "15 cases x 7 providers (each timed eagerly and by CUDA-graph replay) = 156 "
                    "rows")])
def test_validate_shipped_sweeps(name: str, count: str) -> None:
    result = invoke("validate", SWEEPS / name)
    assert result.exit_code == 0, result.output
    assert f"{SWEEPS / name}: ok, {count}" in flat(result.stdout), result.output


def test_validate_counts_rows_after_provider_exclusions(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, seqlen=[32, 48], providers=["sdpa_math", "sdpa_flash"],
                      exclude=[{"provider": "sdpa_math", "seqlen": 48}])
    result = invoke("validate", spec)
    assert result.exit_code == 0, result.output
    assert "2 cases x 2 providers = 3 rows" in flat(result.stdout), result.output


def test_error_key_paths_survive_printing(tmp_path: Path) -> None:
    result = invoke("validate", write_spec(tmp_path, heads=[2, "x"]))
    assert result.exit_code == 2, result.output
    want = "heads[1]: 'x' is not an integer"
    assert want in flat(result.stderr), result.output


# -- env --

def test_env_lists_providers_with_reasons() -> None:
    result = invoke("env", "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 3:
            rows[cells[0]] = (cells[1], cells[2])
    assert rows["dkbench"] == ("pattern", "yes")
    assert rows["sdpa_math"] == ("dense", "yes")
    assert rows["sdpa_flash"] == ("dense", "no: the SDPA FLASH_ATTENTION backend needs a CUDA GPU")
    assert rows["sdpa_efficient"][1] == "no: the SDPA EFFICIENT_ATTENTION backend needs a CUDA GPU"
    assert rows["sdpa_cudnn"][1] == "no: the SDPA CUDNN_ATTENTION backend needs a CUDA GPU"
    assert rows["flex"][1].startswith("no: FlexAttention is timed on CUDA GPUs only")
    assert rows["flash_attn"][1].startswith("no: ")
    assert "interpreter" in result.stdout and "torch" in result.stdout


# -- --out that cannot take a run --

@pytest.fixture
def read_only_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A directory nobody may write into: chmod 555, or for root (whom chmod does not stop) an
    os.access that says no."""
    import os

    path = tmp_path / "locked"
    path.mkdir()
    if os.geteuid() == 0:
        real = os.access

        def access(p, how, *args, **kwargs) -> bool:
            if Path(p).resolve() == path.resolve() and how & os.W_OK:
                return False
            return real(p, how, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
        yield path
        return
    path.chmod(0o555)
    yield path
    path.chmod(0o755)


def one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_run_out_that_is_a_file_exits_2(tmp_path: Path) -> None:
    spec, taken = write_spec(tmp_path), tmp_path / "taken"
    taken.write_text("not a directory")
    result = invoke("run", spec, "--out", taken, "-q")
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == f"error: --out {taken}: is a file, not a directory"
    result = invoke("run", spec, "--out", taken / "below", "-q")
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == (f"error: --out {taken / 'below'}: {taken} is a file, not a "
                                      "directory")
    assert taken.read_text() == "not a directory"


def test_run_out_not_writable_exits_2(tmp_path: Path, read_only_dir: Path) -> None:
    result = invoke("run", write_spec(tmp_path), "--out", read_only_dir, "-q")
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == f"error: --out {read_only_dir}: is not writable"
    assert not list(read_only_dir.iterdir())


@pytest.fixture(scope="module")
def a_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("a_run")
    result = invoke("run", write_spec(folder), "--out", folder / "out", "-q")
    assert result.exit_code == 0, result.output
    return run_dir_of(folder / "out")


def test_merge_out_that_is_a_file_exits_2(a_run: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    result = invoke("merge", a_run, "--out", taken)
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == f"error: --out {taken}: is a file, not a directory"
    assert taken.read_text() == "not a directory"


def test_merge_out_not_writable_exits_2(a_run: Path, read_only_dir: Path) -> None:
    out = read_only_dir / "merged"
    result = invoke("merge", a_run, "--out", out)
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == f"error: --out {out}: {read_only_dir} is not writable"
    assert not out.exists()


# -- Ctrl-C while starting --

@pytest.mark.parametrize("where", ["dkbench.commands.run.load_spec", "dkbench.measure.runner.plan_run",
                                   "dkbench.measure.runner.resolve_device"])
def test_interrupt_while_starting_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            where: str) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupted)
    result = invoke("run", write_spec(tmp_path), "--out", tmp_path / "out", "-q")
    assert result.exit_code == 130, result.output
    assert one_error_line(result) == "Interrupted while starting; nothing was run."


# -- the last line: rows that cannot run here are skipped, not failed --

def test_rows_that_cannot_run_here_are_skipped_not_failed(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, heads=[2, 4], providers=["sdpa_math", "sdpa_flash", "sdpa_cudnn"])
    result = invoke("run", spec, "--device", "cpu", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert "2 of 2 rows ran ok; 4 skipped (cannot run here: sdpa_cudnn, sdpa_flash)." in out, \
        result.output
    assert "did not run ok" not in out, result.output
    frame = read_results(run_dir_of(tmp_path / "out"))
    assert sorted(frame["status"]) == ["ok", "ok"] + ["unsupported"] * 4  # the CSV keeps them


def test_failures_are_counted_apart_from_skipped_rows(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, *args, **kwargs):
        raise ValueError("no launch config fits")

    monkeypatch.setattr(BundledKernel, "prepare", broken)
    spec = write_spec(tmp_path, providers=["dkbench", "sdpa_math", "sdpa_flash"])
    result = invoke("run", spec, "--device", "cpu", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert ("1 of 2 rows did not run ok (see status/message in results.csv); 1 skipped (cannot "
            "run here: sdpa_flash).") in flat(result.stdout), result.output


def summary_row(provider: str, **fields) -> ResultRow:
    """A row of one made-up case for the end-of-run summaries, with ``fields`` set."""
    return ResultRow(run_id="r", timestamp="", gpu="cpu", torch_version="", triton_version="",
                     git_sha="", interpreter=True, case_id="c", provider=provider, mode="fwd",
                     dtype="float32", batch=1, seqlen=32, q_len=32, heads=2, kv_heads=1,
                     head_dim=16, causal=True, pattern="dense", pattern_hash="", block_size=16,
                     density=1.0, seed=0, **fields)


def test_outcome_line_counts_only_unavailable_providers_as_skipped() -> None:
    from dkbench.report.summary import cannot_run_here, outcome_line

    def row(provider: str, status: str) -> ResultRow:
        return summary_row(provider, status=status)

    rows = [row("sdpa_math", "ok"), row("sdpa_flash", "unsupported"),
            row("dkbench", "unsupported")]  # dkbench runs here: its refusal is a failure
    skipped = cannot_run_here(rows, torch.device("cpu"))
    assert skipped == {"sdpa_flash"}
    assert outcome_line(rows, skipped) == (
        "1 of 2 rows did not run ok (see status/message in results.csv); 1 skipped (cannot run "
        "here: sdpa_flash).")
    assert outcome_line(rows[:1], skipped) is None
    assert outcome_line(rows[1:2], skipped) == "1 skipped (cannot run here: sdpa_flash)."


def test_setup_line_sums_each_providers_set_up() -> None:
    from dkbench.report.summary import setup_line

    def row(provider: str, setup_ms: float) -> ResultRow:
        return summary_row(provider, setup_ms=setup_ms)

    rows = [row("fa4", 12_000), row("fa4", 5_000), row("flex", 3_000), row("dkbench", 1_000),
            row("sdpa_math", float("nan"))]  # never got past its size guard
    assert setup_line(rows, 40.0, slowest=2) == (
        "Wall time 40 s: set-up (prepare, check, warm-up) 21 s, most in fa4 17 s, flex 3 s; "
        "timing and the rest 19 s.")
    # The command's start-up before the run counts in its wall time.
    assert setup_line(rows, 40.0, slowest=1, startup_s=12.4) == (
        "Wall time 52 s: start-up (imports, spec, plan) 12 s, set-up (prepare, check, warm-up) "
        "21 s, most in fa4 17 s; timing and the rest 19 s.")
    assert setup_line(rows[-1:], 40.0) is None
    # After compiling ahead, that phase comes first and the rest is what is left of the wall.
    assert setup_line(rows, 60.0, slowest=1, ahead={"seconds": 30.0, "workers": 10}) == (
        "Wall time 60 s: compiling ahead 30 s (10 workers), set-up (prepare, check, warm-up) "
        "21 s, most in fa4 17 s; timing and the rest 9 s.")


def test_ctrl_c_while_importing_ends_in_one_line(monkeypatch, capsys) -> None:
    import types

    from dkbench import launch, startup

    monkeypatch.setattr(startup, "_started", None)  # main() marks a start: undone after the test

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "dkbench.cli", Importing("dkbench.cli"))
    with pytest.raises(SystemExit) as exit_:
        launch.main()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "Interrupted while starting; nothing was run.\n"


def test_summary_table_gives_no_ratio_to_a_baselines_graph_row() -> None:
    from rich.console import Console

    from dkbench.report.summary import summary_table

    def row(provider: str, ms: float, speedup: float, baseline: str) -> ResultRow:
        return summary_row(provider, ms=ms, speedup=speedup, baseline=baseline)

    rows = [row("sdpa_math", 2.0, 1.0, "sdpa_math"), row("dkbench", 1.0, 2.0, "sdpa_math"),
            row("sdpa_math+graph", 0.5, 1.0, "sdpa_math+graph"),
            row("dkbench+graph", 0.25, 2.0, "sdpa_math+graph")]
    console = Console(width=200, record=True)
    console.print(summary_table(rows, "sdpa_math"))
    text = console.export_text()
    assert "2.000 " in text and "0.500 " in text and "(1.00x)" not in text
    assert "1.000 (2.00x)" in text and "*0.250 (2.00x)" in text


def test_an_empty_triton_interpret_still_gets_the_interpreter_on_the_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """TRITON_INTERPRET= (empty) is not a choice: it reads as unset, so a CPU run gets the
    interpreter; a value the user gave is kept."""
    from dkbench import cli

    monkeypatch.setenv("TRITON_INTERPRET", "")
    cli._use_interpreter_without_gpu(["run", "--device", "cpu"])
    assert os.environ["TRITON_INTERPRET"] == "1"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cli._use_interpreter_without_gpu(["run", "--device", "cpu"])
    assert os.environ["TRITON_INTERPRET"] == "0"


@pytest.mark.parametrize(("device_key", "flags", "interprets"), [
    ("cpu", [], True),
    ("cpu", ["--device", "auto"], True),
    ("cpu", ["--device=cuda"], False),
    ("auto", [], False),
])
def test_a_specs_device_cpu_turns_the_interpreter_on_where_a_gpu_is_visible(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device_key: str, flags: list[str],
        interprets: bool) -> None:
    """The interpreter is chosen before Triton loads, so the spec's `device: cpu` is read ahead
    of the command; --device other than auto overrides it, as it does in the run."""
    import torch

    from dkbench import cli

    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\ndevice: {device_key}\n")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cli._use_interpreter_without_gpu(["run", str(spec), *flags])
    assert (os.environ.get("TRITON_INTERPRET") == "1") is interprets


def test_an_unreadable_spec_is_left_to_the_command(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dkbench import cli

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"device: [cpu\n\xff")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cli._use_interpreter_without_gpu(["run", str(bad), str(tmp_path)])
    assert "TRITON_INTERPRET" not in os.environ
