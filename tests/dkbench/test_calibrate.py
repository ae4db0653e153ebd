"""GPU calibration: the arithmetic, the file beside the config cache, and `dkbench env --calibrate`.

No GPU here: a fake CUDA device, with `calibrate` and the GPU identity monkeypatched."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dkbench.measure import calibrate as cal_mod
from dkbench.measure.calibrate import Calibration, CalibrationWarning
from kernels.config_cache import ENV_VAR

from .cli_helpers import flat, invoke

CUDA = torch.device("cuda", 0)
H100 = Calibration(gpu="NVIDIA H100 80GB HBM3", capability="9.0", torch="2.5.0", triton="3.1.0",
                   matmul_tflops={"bfloat16": 700.5, "float16": 690.0, "float8_e4m3fn": 1300.0},
                   copy_gbs=2900.0, sm_clock_mhz=1755.0, measured_at="2025-01-01T12:00:00+00:00")


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """`calibrate` returns H100 and records each device it was asked to measure."""
    calls: list[torch.device] = []

    def fake_calibrate(device, seconds=10.0):
        calls.append(device)
        return H100

    monkeypatch.setattr(cal_mod, "calibrate", fake_calibrate)
    monkeypatch.setattr(cal_mod, "_identity",
                        lambda device: (H100.gpu, H100.capability, H100.torch, H100.triton))
    return calls


def entries(path: Path) -> dict:
    return json.loads(path.read_text())["entries"]


def test_arithmetic_against_hand_numbers() -> None:
    # 2 * 8192^3 = 1.0995e12 flop in 2 ms -> 549.76 TFLOP/s
    assert cal_mod.tflops(8192, 8192, 8192, 2.0) == pytest.approx(549.755813888)
    assert cal_mod.tflops(1000, 2000, 500, 1.0) == pytest.approx(2.0)
    # 2 GiB read + 2 GiB written in 1.6 ms -> 2684.35 GB/s
    assert cal_mod.copy_gbs(2 * 2**30, 1.6) == pytest.approx(2684.354560)
    assert cal_mod.copy_gbs(10**9, 1000.0) == pytest.approx(2.0)


def test_dict_round_trip() -> None:
    d = H100.as_dict()
    assert Calibration.from_dict(json.loads(json.dumps(d))) == H100
    no_clock = replace(H100, sm_clock_mhz=None, matmul_tflops={"bfloat16": 1.0})
    assert Calibration.from_dict(no_clock.as_dict()) == no_clock
    with pytest.raises(KeyError):
        Calibration.from_dict({k: v for k, v in d.items() if k != "copy_gbs"})


def test_cpu_has_no_calibration(tmp_path: Path, fake_gpu: list) -> None:
    cpu = torch.device("cpu")
    assert cal_mod.load_or_calibrate(cpu, tmp_path / "c.json") is None
    assert cal_mod.stored(cpu, tmp_path / "c.json") is None
    assert cal_mod.unavailable_reason(cpu).startswith("no CUDA device")
    assert cal_mod.unavailable_reason(CUDA) is None
    assert fake_gpu == [] and not (tmp_path / "c.json").exists()


def test_measures_once_then_reads_and_force_measures_again(tmp_path: Path, fake_gpu: list) -> None:
    path = tmp_path / "new" / "dir" / "calibration.json"
    assert cal_mod.stored(CUDA, path) is None
    assert cal_mod.load_or_calibrate(CUDA, path) == H100
    assert len(fake_gpu) == 1 and path.is_file()
    assert list(entries(path).values()) == [H100.as_dict()]
    assert cal_mod.load_or_calibrate(CUDA, path) == H100
    assert cal_mod.stored(CUDA, path) == H100
    assert len(fake_gpu) == 1
    assert cal_mod.load_or_calibrate(CUDA, path, force=True) == H100
    assert len(fake_gpu) == 2
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temp left


def test_another_version_is_measured(tmp_path: Path, fake_gpu: list,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "calibration.json"
    cal_mod.load_or_calibrate(CUDA, path)
    monkeypatch.setattr(cal_mod, "_identity", lambda d: (H100.gpu, "9.0", "2.6.0", H100.triton))
    assert cal_mod.stored(CUDA, path) is None
    cal_mod.load_or_calibrate(CUDA, path)
    assert len(fake_gpu) == 2


def test_entries_of_other_gpus_are_kept(tmp_path: Path, fake_gpu: list) -> None:
    path = tmp_path / "calibration.json"
    a100 = replace(H100, gpu="NVIDIA A100-SXM4-80GB", capability="8.0")
    path.write_text(json.dumps({"format": 1, "entries": {a100.key: a100.as_dict()}}))
    cal_mod.load_or_calibrate(CUDA, path)
    assert entries(path) == {a100.key: a100.as_dict(), H100.key: H100.as_dict()}


def test_corrupt_file_warns_and_is_replaced(tmp_path: Path, fake_gpu: list) -> None:
    path = tmp_path / "calibration.json"
    path.write_bytes(os.urandom(256) + b"\xff\xfe")
    with pytest.warns(CalibrationWarning, match=str(path)) as caught:
        assert cal_mod.load_or_calibrate(CUDA, path) == H100
    assert caught[0].message.path == path
    assert len(fake_gpu) == 1
    assert list(entries(path).values()) == [H100.as_dict()]


@pytest.mark.parametrize("text", ['{"format": 1, "entries": {"k": {"gpu": "x"}}}',
                                  '{"format": 99, "entries": {}}', "[1, 2]", '{"format": 1'])
def test_file_of_the_wrong_shape_warns(tmp_path: Path, fake_gpu: list, text: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.warns(CalibrationWarning, match=str(path)):
        assert cal_mod.stored(CUDA, path) is None


def test_unwritable_file_warns_and_returns_the_measurement(tmp_path: Path, fake_gpu: list,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "calibration.json"

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(cal_mod.os, "replace", refuse)
    with pytest.warns(CalibrationWarning, match=str(path)):
        assert cal_mod.load_or_calibrate(CUDA, path) == H100
    assert not path.exists() and list(tmp_path.iterdir()) == []  # temp file removed too


def test_path_follows_the_cache_dir_override(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache" / "configs.json"))
    assert cal_mod.calibration_path() == tmp_path / "cache" / "calibration.json"
    monkeypatch.delenv(ENV_VAR)
    assert cal_mod.calibration_path().name == "calibration.json"
    assert cal_mod.calibration_path().parent != tmp_path / "cache"


def test_env_calibrate_on_cpu_prints_the_reason() -> None:
    """The tables still print; the calibration asked for and not done is an error, exit 2."""
    result = invoke("env", "--calibrate", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert ("--calibrate: no CUDA device (interpreter timings have no speed of light); it "
            "measures a CUDA GPU") in flat(result.stderr)
    assert "providers" in result.stdout and "Traceback" not in result.output
