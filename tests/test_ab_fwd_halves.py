"""benchmarks/ab_fwd_halves.py off the GPU: its arguments and its refusal without a Hopper GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("ab_fwd_halves",
                                                  ROOT / "benchmarks" / "ab_fwd_halves.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ab_fwd_halves"] = module
    spec.loader.exec_module(module)
    return module


ab = _tool()


@pytest.mark.parametrize("argv, message", [
    (["--densities", "0.2,x"], "expected numbers"),
    (["--densities", "0,0.5"], "densities must be in (0, 1]"),
    (["--densities", "1.5"], "densities must be in (0, 1]"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--seqlen", "1000"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_the_reason(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        ab.main(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_hopper_gpu_it_says_so_and_exits_2(capsys, tmp_path) -> None:
    assert ab.main(["--out", str(tmp_path / "ab.json")]) == 2
    assert "needs a Hopper GPU" in capsys.readouterr().err
    assert not (tmp_path / "ab.json").exists()


def test_each_kernel_is_timed_at_its_default_steps() -> None:
    from kernels.configs import GLUON_DEFAULT, GLUON_DQ_DEFAULT

    assert ab.FORMS == {"fwd": (GLUON_DEFAULT.block_n // 64, GLUON_DEFAULT.num_stages),
                        "dq": (GLUON_DQ_DEFAULT.block_n // 64, GLUON_DQ_DEFAULT.num_stages)}
