"""benchmarks/bwd_split.py off the GPU: its arguments, its refusal without a Hopper GPU, and the
step count behind the bytes it reports for the fused backward's dq adds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("bwd_split", ROOT / "benchmarks" / "bwd_split.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bwd_split"] = module
    spec.loader.exec_module(module)
    return module


split = _tool()


@pytest.mark.parametrize("argv, message", [
    (["--seqlens", "8192,x"], "expected integers"),
    (["--seqlens", "4096"], "allowed: 8192, 16384, 32768, 65536"),
    (["--stages", "0"], "allowed: 1, 2, 3"),
    (["--gluon-stages", "5"], "allowed: 1, 2, 3, 4"),
    (["--gluon-stages", "2,3"],
     "--gluon-stages: at head_dim 128 the Gluon fused backward takes 1 to 2 stages, got 3"),
    (["--head-dim", "96"], "invalid choice: 96"),
    (["--pattern", "random"], "invalid choice: 'random'"),
    (["--rounds", "0"], "--rounds must be at least 1"),
])
def test_bad_arguments_exit_2_with_the_reason(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        split.main(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_hopper_gpu_it_says_so_and_exits_2(capsys, tmp_path) -> None:
    assert split.main(["--out", str(tmp_path / "split.json")]) == 2
    assert "needs a Hopper GPU" in capsys.readouterr().err
    assert not (tmp_path / "split.json").exists()


@pytest.mark.parametrize("seqlen", [1024, 4096])
def test_pair_steps_are_the_plan_entries_of_every_head(seqlen) -> None:
    from kernels.bwd_fused_ws import pair_plan

    layout = split._layout("phi3", seqlen)
    plan = pair_plan(layout, seqlen, seqlen, split.HEADS, split.KV_HEADS)
    # Each pair step covers two 64-key boxes: at least half the 64-key steps, never all.
    assert split._steps(layout, seqlen) / 2 <= split._pair_steps(layout, seqlen)
    assert split._pair_steps(layout, seqlen) == int(plan.row_ptr[-1]) < split._steps(layout, seqlen)


def test_dense_pattern_is_every_causal_block() -> None:
    layout = split._layout("dense", 1024)
    assert layout.pattern[0, :16, :16].equal(torch.ones(16, 16, dtype=torch.bool).tril())


@pytest.mark.parametrize("seqlen", [1024, 4096])
def test_steps_are_the_kept_blocks_of_every_head(seqlen) -> None:
    from kernels import local_stride_layout

    layout = local_stride_layout(max_seq_len=seqlen, **split.PHI3)
    blocks = seqlen // layout.block_size
    # Every kept (query block, kv block) of each query head's pattern, below the diagonal.
    kept = layout.pattern[:, :blocks, :blocks] & torch.ones(blocks, blocks, dtype=torch.bool).tril()
    per_head = split.HEADS // layout.pattern.shape[0]
    assert split._steps(layout, seqlen) == int(kept.sum()) * per_head
    assert split._steps(layout, seqlen) > 0
