"""`dkbench env` and its calibration file under hostile inputs: entries that lie about their GPU or
hold impossible numbers, a second writer, a place the file cannot be written, a failed measurement.

No GPU here: a fake CUDA device (test_calibrate's fixture), and for the CLI a fake environment."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dkbench.measure import calibrate as cal_mod
from dkbench.measure.calibrate import CalibrationWarning
from kernels.config_cache import ENV_VAR

from .cli_helpers import flat, invoke
from .test_calibrate import CUDA, H100, entries, fake_gpu  # noqa: F401 - fake_gpu is a fixture

A100 = replace(H100, gpu="NVIDIA A100-SXM4-80GB", capability="8.0")


def write(path: Path, body: dict, fmt: object = 1) -> None:
    path.write_text(json.dumps({"format": fmt, "entries": body}))


@pytest.fixture
def fake_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: list) -> Path:  # noqa: F811
    """`dkbench env` sees the fake CUDA device; the cache lives in tmp_path. The config cache path."""
    from dkbench.measure import envinfo, providers, runner

    monkeypatch.setattr(runner, "resolve_device", lambda choice: CUDA)
    monkeypatch.setattr(envinfo, "environment", lambda device: {"device": str(device)})
    monkeypatch.setattr(providers, "PROVIDERS", {})
    cache = tmp_path / "configs.json"
    monkeypatch.setenv(ENV_VAR, str(cache))
    return cache


def test_entry_filed_under_another_gpus_key_is_not_used(tmp_path: Path,
                                                        fake_gpu: list) -> None:  # noqa: F811
    """An A100's numbers under the H100's key (a hand-edited or merged file) are not this GPU's."""
    path = tmp_path / "calibration.json"
    write(path, {H100.key: A100.as_dict()})
    with pytest.warns(CalibrationWarning, match="A100"):
        assert cal_mod.stored(CUDA, path) is None
    with pytest.warns(CalibrationWarning):
        assert cal_mod.load_or_calibrate(CUDA, path) == H100
    assert len(fake_gpu) == 1


@pytest.mark.parametrize("field, value", [("copy_gbs", 0), ("copy_gbs", -5.0),
                                          ("copy_gbs", float("nan")), ("copy_gbs", float("inf")),
                                          ("copy_gbs", True), ("matmul_tflops", {"bfloat16": 0}),
                                          ("matmul_tflops", {"bfloat16": float("nan")}),
                                          ("matmul_tflops", [["bfloat16", 700.0]]),
                                          ("sm_clock_mhz", -1.0)])
def test_impossible_numbers_are_not_used(tmp_path: Path, fake_gpu: list,  # noqa: F811
                                         field: str, value: object) -> None:
    """A zero bandwidth divides by zero in the speed of light; NaN or negative ones make it lie."""
    path = tmp_path / "calibration.json"
    write(path, {H100.key: {**H100.as_dict(), field: value}})
    with pytest.warns(CalibrationWarning, match=field):
        assert cal_mod.stored(CUDA, path) is None


def test_format_true_is_not_format_1(tmp_path: Path, fake_gpu: list) -> None:  # noqa: F811
    path = tmp_path / "calibration.json"
    write(path, {H100.key: H100.as_dict()}, fmt=True)
    with pytest.warns(CalibrationWarning, match="format"):
        assert cal_mod.stored(CUDA, path) is None


def test_an_entry_written_during_the_measurement_is_kept(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         fake_gpu: list) -> None:  # noqa: F811
    """Another GPU's calibration, finished while this one measured, survives this one's write."""
    path = tmp_path / "calibration.json"

    def other_writer_meanwhile(device, seconds=10.0):
        write(path, {A100.key: A100.as_dict()})
        return H100

    monkeypatch.setattr(cal_mod, "calibrate", other_writer_meanwhile)
    assert cal_mod.load_or_calibrate(CUDA, path) == H100
    assert entries(path) == {A100.key: A100.as_dict(), H100.key: H100.as_dict()}


def test_write_goes_through_a_symlink(tmp_path: Path, fake_gpu: list) -> None:  # noqa: F811
    """A calibration.json linked to a file kept elsewhere stays linked after a write."""
    real = tmp_path / "kept" / "calibration.json"
    real.parent.mkdir()
    write(real, {A100.key: A100.as_dict()})
    link = tmp_path / "calibration.json"
    link.symlink_to(real)
    cal_mod.load_or_calibrate(CUDA, link)
    assert link.is_symlink() and set(entries(real)) == {A100.key, H100.key}


@pytest.mark.parametrize("blocker", ["dir_in_place", "file_as_folder"])
def test_env_calibrate_refuses_an_unwritable_place_before_measuring(fake_env: Path,
                                                                    fake_gpu: list,  # noqa: F811
                                                                    blocker: str) -> None:
    """Ten seconds of measuring that cannot be kept is not a success: exit 2 first, naming it."""
    if blocker == "dir_in_place":
        (fake_env.parent / "calibration.json").mkdir()
        cache = fake_env
    else:
        (fake_env.parent / "afile").write_text("x")
        cache = fake_env.parent / "afile" / "sub" / "configs.json"
    result = invoke("env", "--calibrate", env={ENV_VAR: str(cache)})
    assert result.exit_code == 2, result.output
    assert "calibration.json" in flat(result.stderr) and "Traceback" not in result.output
    assert fake_gpu == []


def test_env_calibrate_refuses_a_cache_variable_naming_a_directory(fake_env: Path,
                                                                   fake_gpu: list) -> None:  # noqa: F811
    """DKBENCH_CACHE=DIR would put calibration.json beside DIR, not in it: say so, measure nothing."""
    fake_env.parent.joinpath("cachedir").mkdir()
    result = invoke("env", "--calibrate", env={ENV_VAR: str(fake_env.parent / "cachedir")})
    assert result.exit_code == 2, result.output
    assert f"{ENV_VAR}={fake_env.parent / 'cachedir'}" in flat(result.stderr)
    assert "is a directory" in flat(result.stderr)
    assert fake_gpu == [] and not (fake_env.parent / "calibration.json").exists()


def test_env_calibrate_failing_measurement_is_one_message(fake_env: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(device, seconds=10.0):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cal_mod, "calibrate", out_of_memory)
    result = invoke("env", "--calibrate")
    assert result.exit_code == 1, result.output
    assert "calibrating failed" in flat(result.stderr) and "out of memory" in flat(result.stderr)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (fake_env.parent / "calibration.json").exists()


def test_env_shows_a_stored_calibration_and_refuses_a_foreign_one(fake_env: Path) -> None:
    path = fake_env.parent / "calibration.json"
    write(path, {H100.key: H100.as_dict()})
    result = invoke("env")
    assert result.exit_code == 0, result.output
    assert "700.5" in result.stdout and str(path) in flat(result.stdout)
    write(path, {H100.key: A100.as_dict()})
    result = invoke("env")
    assert result.exit_code == 0, result.output
    assert "700.5" not in result.stdout and "none stored" in flat(result.stdout)
    assert "warning:" in result.stderr


def test_clock_row_does_not_claim_nvml_is_missing() -> None:
    """None also means NVML is installed but could not read the clock (no permission, a MIG slice)."""
    rows = dict(cal_mod.summary_rows(replace(H100, sm_clock_mhz=None)))
    assert rows["SM clock MHz"] == ("n/a (NVML could not read it; pip install nvidia-ml-py if it "
                                    "is missing)")


def test_env_calibrate_that_cannot_save_says_so(fake_env: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills mid-write: the numbers are shown, the file row does not claim them, exit 1."""
    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cal_mod.os, "replace", full)
    result = invoke("env", "--calibrate")
    assert result.exit_code == 1, result.output
    assert "NOT saved" in flat(result.stdout) and "No space left" in flat(result.stderr)
    assert "could not write" in flat(result.stderr) and "Traceback" not in result.output
    assert list(fake_env.parent.iterdir()) == []  # no temp file left behind


def test_env_calibrate_makes_a_missing_cache_folder(fake_env: Path, fake_gpu: list) -> None:  # noqa: F811
    cache = fake_env.parent / "new" / "deeper" / "configs.json"
    result = invoke("env", "--calibrate", env={ENV_VAR: str(cache)})
    assert result.exit_code == 0, result.output
    assert entries(cache.parent / "calibration.json") == {H100.key: H100.as_dict()}
    assert len(fake_gpu) == 1 and "NOT saved" not in result.stdout


def test_env_calibrate_refuses_a_read_only_folder(fake_env: Path, fake_gpu: list,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # os.access stands in for a read-only folder: root (as in CI containers) may write anywhere.
    real_access = cal_mod.os.access
    monkeypatch.setattr(cal_mod.os, "access", lambda p, mode: False if Path(p) == fake_env.parent
                        else real_access(p, mode))
    result = invoke("env", "--calibrate")
    assert result.exit_code == 2, result.output
    assert f"{fake_env.parent} is not writable" in flat(result.stderr)
    assert fake_gpu == []


def test_a_directory_in_place_is_not_promised_a_replacement(tmp_path: Path,
                                                            fake_gpu: list) -> None:  # noqa: F811
    path = tmp_path / "calibration.json"
    path.mkdir()
    with pytest.warns(CalibrationWarning, match="is a directory") as caught:
        assert cal_mod.stored(CUDA, path) is None
    assert "replaced" not in str(caught[0].message) and path.is_dir()


@pytest.mark.parametrize("value", ["0", "true"])
def test_env_on_the_cpu_with_the_interpreter_off_says_the_bundled_kernel_cannot_run(
        value: str) -> None:
    """Was: "dkbench ... yes" under TRITON_INTERPRET=0, though its rows on the CPU are errors
    then (`run` warns so, and `tune` refuses)."""
    result = invoke("env", "--device", "cpu", env={"TRITON_INTERPRET": value})
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.stdout.splitlines() if "│ dkbench " in line]
    assert f"no: TRITON_INTERPRET={value!r} turns Triton's interpreter off" in row
    result = invoke("env", "--device", "cpu", env={"TRITON_INTERPRET": "1"})
    (row,) = [line for line in result.stdout.splitlines() if "│ dkbench " in line]
    assert "│ yes" in row
