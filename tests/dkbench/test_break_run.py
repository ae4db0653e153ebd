"""`dkbench run`, `validate` and `env` against input that once slipped through: flags that did
nothing or were ignored, a damaged meta.json on --resume, Ctrl-C outside the timed loop. Each is
refused in one line naming the flag or file, the key and what is allowed (exit 2), or stops with
exit code 130 and nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dkbench.results.schema import read_results

from .cli_helpers import flat, invoke, run_dir_of, run_to_end
from .specs import write_spec


def refused(result, *words: str) -> str:
    """The one error line of a run refused with exit code 2, holding every one of ``words``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in flat(lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the tiny spec over two lengths (sdpa_math only: a second or two)."""
    folder = tmp_path_factory.mktemp("finished")
    return run_to_end(write_spec(folder, seqlen=[32, 64]), folder / "out")


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out" / finished.name
    shutil.copytree(finished, copy)
    return copy


# -- flags --

def test_providers_flag_naming_one_twice_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("run", write_spec(tmp_path), "--out", out, "-q",
                    "--providers", "sdpa_math,sdpa_math")
    refused(result, "--providers 'sdpa_math,sdpa_math': sdpa_math given twice",
            "name each provider once")
    assert not out.exists()  # before, each ran: two rows of one (case, provider) key


def test_env_refuses_an_unknown_device() -> None:
    refused(invoke("env", "--device", "tpu"), "--device 'tpu': allowed values are auto, cuda, cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="calibrates on a GPU")
def test_env_calibrate_that_cannot_calibrate_exits_2() -> None:
    result = invoke("env", "--device", "cpu", "--calibrate")
    refused(result, "--calibrate: no CUDA device", "it measures a CUDA GPU")
    assert "providers" in result.stdout  # the tables still come first


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_spec_device_cuda_without_gpu_names_the_spec_key(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, device="cuda")
    result = invoke("run", spec, "--out", tmp_path / "out", "-q")
    line = refused(result, f"{spec}: device: cuda, but no CUDA GPU is visible",
                   "allowed here: auto, cpu", "--device cpu")
    assert "--device cuda" not in line  # not a flag the user gave
    assert not (tmp_path / "out").exists()


def test_only_matching_nothing_names_the_values_there_are(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, seqlen=[32, 64])
    result = invoke("run", spec, "--out", tmp_path / "out", "-q", "--only", "mode=fwd",
                    "--only", "seqlen=96")
    refused(result, "--only mode=fwd seqlen=96: no case of", "seqlen=96 matches none: the "
            "cases have seqlen 32, 64")


def test_out_elsewhere_with_resume_is_refused(run_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    result = invoke("run", "--resume", run_copy, "--out", elsewhere, "-q")
    refused(result, f"--out {elsewhere}: a resumed run writes into the directory it finishes",
            f"--resume {run_copy}", "drop --out")
    assert not elsewhere.exists()
    same = invoke("run", "--resume", run_copy, "--out", run_copy.parent, "-q")
    assert same.exit_code == 0, same.output  # --out naming the run's own parent is fine


# -- a damaged meta.json on --resume --

def _meta(run_dir: Path, **changes: object) -> None:
    path = run_dir / "meta.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(("key", "value", "kind"), [
    ("providers", "sdpa_math", "a list of strings"),  # was split into letters: "unknown s, d, p"
    ("only", "seqlen=32", "a list of strings"),
    ("only", [32], "a list of strings"),
    ("shard", 5, "a string"),  # was a TypeError traceback
])
def test_resume_refuses_recorded_flags_of_the_wrong_type(run_copy: Path, key: str, value: object,
                                                        kind: str) -> None:
    _meta(run_copy, **{key: value})
    result = invoke("run", "--resume", run_copy, "-q")
    refused(result, f"--resume {run_copy}: {run_copy / 'meta.json'}: key {key!r} holds "
            f"{json.dumps(value)}; allowed: null or {kind}")


def test_resume_with_spec_refuses_a_meta_that_is_a_list(run_copy: Path, tmp_path: Path) -> None:
    (run_copy / "meta.json").write_text("[1, 2]")
    spec = write_spec(tmp_path, seqlen=[32, 64])
    result = invoke("run", spec, "--resume", run_copy, "-q")  # was an AttributeError traceback
    refused(result, f"{run_copy / 'meta.json'}: holds a JSON list, not the object `dkbench run` "
            "writes")


def test_resume_with_spec_refuses_a_meta_that_is_a_directory(run_copy: Path,
                                                             tmp_path: Path) -> None:
    (run_copy / "meta.json").unlink()
    (run_copy / "meta.json").mkdir()
    spec = write_spec(tmp_path, seqlen=[32, 64])
    result = invoke("run", spec, "--resume", run_copy, "-q")  # was an IsADirectoryError traceback
    refused(result, f"{run_copy / 'meta.json'}: cannot be read (Is a directory)")


# -- Ctrl-C outside the timed loop --

def test_ctrl_c_before_the_first_row_leaves_no_run_directory(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dkbench.measure.size_guard.cpu_warning", interrupted)
    out = tmp_path / "out"
    result = invoke("run", write_spec(tmp_path), "--device", "cpu", "--out", out, "-q")
    assert result.exit_code == 130, result.output  # was click's "Aborted!" and exit code 1
    assert result.stderr.strip().splitlines()[-1] == "Interrupted while starting; nothing was run."
    assert out.is_dir() and not list(out.iterdir())  # the empty run directory went again


def test_ctrl_c_while_summing_up_keeps_every_row(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dkbench.report.summary.outcome_line", interrupted)
    out = tmp_path / "out"
    result = invoke("run", write_spec(tmp_path, seqlen=[32, 64]), "--device", "cpu", "--out", out,
                    "-q")
    assert result.exit_code == 130, result.output
    run_dir = run_dir_of(out)
    assert f"Interrupted while summing up; every row is in {run_dir}" in flat(result.stderr)
    assert len(read_results(run_dir)) == 2


# -- the environment --

def test_interpreter_turned_off_on_the_cpu_is_named_before_the_rows(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, providers=["dkbench", "sdpa_math"])
    result = invoke("run", spec, "--device", "cpu", "--out", tmp_path / "out", "-q",
                    env={"TRITON_INTERPRET": "0"})
    assert result.exit_code == 0, result.output
    assert ("warning: TRITON_INTERPRET='0' turns Triton's interpreter off, so dkbench cannot run "
            "on the CPU and its rows will be errors" in flat(result.stderr)), result.output


@pytest.mark.parametrize("command", ["run-out", "run-spec", "validate", "gate", "plot", "report",
                                     "merge"])
def test_a_path_name_too_long_for_the_os_is_one_line(run_copy: Path, tmp_path: Path,
                                                     command: str) -> None:
    # Was: an OSError traceback (exit 1): pathlib's exists() and is_file() raise ENAMETOOLONG.
    long = tmp_path / ("d" * 300)
    args = {"run-out": ["run", write_spec(tmp_path), "--out", long, "-q"],
            "run-spec": ["run", long, "--out", tmp_path / "o", "-q"],
            "validate": ["validate", long],
            "gate": ["gate", run_copy, "--baseline", long], "plot": ["plot", long],
            "report": ["report", run_copy, "--out", long / "r.md"],
            "merge": ["merge", run_copy, "--out", long]}[command]
    refused(invoke(*args), f"{long}", "File name too long", "allowed: file names of at most 255")


def test_a_spec_name_that_fits_makes_its_run_directory(tmp_path: Path) -> None:
    run_dir = run_to_end(write_spec(tmp_path, name="a" * 200), tmp_path / "out")
    assert run_dir.name.startswith("a" * 200 + "-")


# -- two runs started at once into one --out --

def test_a_run_directory_made_by_another_run_meanwhile_takes_the_next_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, taken = tmp_path / "out", []
    mkdir = Path.mkdir

    def raced(self: Path, *args, **kwargs) -> None:
        if self.parent == out and not taken:  # the other run's mkdir lands first
            taken.append(self)
            mkdir(self, parents=True)
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", raced)
    result = invoke("run", write_spec(tmp_path), "--out", out, "-q")
    # was exit 2, "cannot make the run directory tiny-... there (File exists)"
    assert result.exit_code == 0, result.output
    (other,) = taken
    assert not list(other.iterdir())  # the other run's directory is left to it
    assert len(read_results(out / f"{other.name}-2")) == 1


# -- SIGTERM, as a scheduler or `kill` sends it --

ROOT = Path(__file__).resolve().parents[2]


def _data_rows(out: Path) -> int:
    found = list(out.glob("*/results.csv"))
    return max(len(found[0].read_text().splitlines()) - 1, 0) if found else 0


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path: Path) -> None:
    # Rows on the CPU take milliseconds (the wall clock times a fixed number of calls), so the
    # run is stopped the moment its first row shows and the SIGTERM waits for it: many rows left.
    cases = 24
    spec = write_spec(tmp_path, seqlen=[32 + 16 * i for i in range(cases)],
                      timing={"warmup_ms": 1, "rep_ms": 1, "interleave": False})
    out = tmp_path / "out"
    env = {**os.environ, "COLUMNS": "400"}
    child = subprocess.Popen([sys.executable, "cli.py", "run", str(spec), "--out", str(out),
                              "-q"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _data_rows(out) < 1 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGSTOP)
    child.send_signal(signal.SIGTERM)
    child.send_signal(signal.SIGCONT)
    _, stderr = child.communicate(timeout=60)
    # was: killed outright (-15), with no word of where the rows are or how to finish them
    assert child.returncode == 130, stderr
    run_dir = run_dir_of(out)
    assert f"finish with --resume {run_dir}" in flat(stderr), stderr
    kept = _data_rows(out)
    assert 1 <= kept < cases, stderr
    result = invoke("run", "--resume", run_dir, "-q")
    assert result.exit_code == 0, result.output
    frame = read_results(run_dir)
    assert sorted(frame["seqlen"]) == [32 + 16 * i for i in range(cases)]
