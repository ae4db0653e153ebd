"""`dkbench tune` on fp8 cases: the fp8 forward (kernel "fp8") is planned with its own rules and
default, tuned through the interpreter, cached under its key, and found by the next run; a mode
without a forward is refused, saying why."""

from __future__ import annotations

from pathlib import Path

import torch

import kernels.select as select
from dkbench.measure import runner
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import FP8, expand
from dkbench.tune.plan import plan_tune
from dkbench.tune.space import Problem, build_space, plan_candidates
from kernels import LaunchConfig
from kernels.config_cache import ConfigCache

from .cli_helpers import flat, invoke
from .specs import needs_interpreter, write_spec

CPU = torch.device("cpu")
# Two 32-key sparse blocks a 64-key step can gather: the fp8 forward may step past one block.
FP8_TUNE = {"dtype": "fp8", "seqlen": 128, "heads": 4, "kv_heads": 2, "head_dim": 32,
            "patterns": [{"type": "local_stride", "block_size": 32, "local_blocks": 2,
                          "vert_stride": 2}],
            "providers": ["dkbench"]}


def test_an_fp8_case_plans_its_forward_by_its_own_rules(tmp_path: Path) -> None:
    sweep = load_spec(write_spec(tmp_path, **{**FP8_TUNE, "mode": ["fwd", "fwd_bwd"]}))
    (job,) = plan_tune(sweep, ("fwd_bwd",), CPU, {})  # its backward is not tuned
    (cands,) = job.candidates
    assert cands.kernel == "fp8" and cands.default == LaunchConfig(32, 32, 4, 1)
    # block_n 16 is below the fp8 products' k of 32; the 16-bit forward's rules would have
    # refused block_n past the 32-key block instead.
    assert [c.short() for c in cands.run] == ["m32n32w4s1", "m16n32w4s1"]
    assert {c.short(): why for c, why in cands.pruned} == {
        "m16n16w4s1": "block_n=16 must be a power of two >= 32 (fp8 products take k >= 32)",
        "m32n16w4s1": "block_n=16 must be a power of two >= 32 (fp8 products take k >= 32)"}
    wide = build_space("fp8", CPU, 32, {"block_n": (64,)})
    problem = Problem("fp8", 32, 32, getattr(torch, FP8), None, None, CPU)
    assert {c.block_n for c in plan_candidates(wide, problem, CPU).run} == {32, 64}


def test_a_gluon_fp8_config_off_hopper_is_pruned_saying_why(tmp_path: Path) -> None:
    space = build_space("fp8", CPU, 64, {"block_m": (128,), "block_n": (128,), "impl": ("gluon",)})
    problem = Problem("fp8", 64, 128, getattr(torch, FP8), None, None, CPU)
    cands = plan_candidates(space, problem, CPU)
    assert [c.short() for c in cands.run] == ["m32n32w4s1"]  # the default alone
    assert all("impl='gluon'" in why for _, why in cands.pruned), cands.pruned


def test_a_tune_of_fp8_cases_without_a_forward_is_refused(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, **FP8_TUNE)
    result = invoke("tune", spec, "--device", "cpu", "--mode", "bwd", "--dry-run",
                    "--cache", tmp_path / "cache.json")
    text = flat(result.output)
    assert result.exit_code == 2 and "Traceback" not in text, result.output
    assert "an fp8 case tunes its forward only (kernel fp8" in text
    assert "use --mode fwd or fwd_bwd" in text


@needs_interpreter
def test_an_fp8_tune_caches_its_winner_and_the_run_uses_it(tmp_path: Path,
                                                           cache_env: Path) -> None:
    spec = write_spec(tmp_path, **FP8_TUNE)
    result = invoke("tune", spec, "--device", "cpu", "--cache", cache_env,
                    "--out", tmp_path / "tune")
    assert result.exit_code == 0, result.output
    (entry,) = ConfigCache(cache_env).entries().values()
    assert (entry["key"]["kernel"], entry["key"]["dtype"]) == ("fp8", FP8)
    winner = LaunchConfig.from_dict(entry["config"])
    assert winner.short() in ("m32n32w4s1", "m16n32w4s1")

    select.clear_memo()
    sweep = load_spec(spec)
    plan = runner.plan_run(sweep, expand(sweep), ["dkbench"], tmp_path / "run", None)
    (row,) = runner.execute(sweep, spec.read_text(), plan, CPU)
    assert row.status == "ok", row.message
    assert row.config_source == "cache" and row.config.startswith(winner.short()), row
