"""`dkbench tune`: the space and its prune rules, dry runs, failures per candidate, and a tiny real
tune on the CPU interpreter whose cache a following `run` uses."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner, Result

import kernels.configs
import kernels.select as select
from dkbench.commands.tune import tune
from dkbench.errors import BadInputError
from dkbench.measure import runner
from dkbench.measure.check import CheckResult
from dkbench.measure.providers import bundled as bundled
from dkbench.measure.timing import Interleaved, Measurement, Ratio
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand
from dkbench.tune import precompile
from dkbench.tune import tuner as tuning
from dkbench.tune.plan import CPU_SHAPE, GPU_SHAPE, plan_tune, sweep_from_flags
from dkbench.tune.space import (
    Problem,
    build_space,
    fits_shared_memory,
    fits_sparse_block,
    kernel_accepts,
    parse_impl_list,
    parse_int_list,
    plan_candidates,
    prune_reason,
    shared_memory_bytes,
)
from kernels import LaunchConfig, reference_attention
from kernels.config_cache import ConfigCache
from tests.dkbench.specs import needs_interpreter

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only its .type is read by the code under test here
COLUMNS = ["run_id", "case_id", "kernel", "dtype", "seqlen", "heads", "kv_heads", "head_dim",
           "block_size", "pattern", "block_m", "block_n", "num_warps", "num_stages", "impl", "ms",
           "ms_p20", "ms_p80", "status", "message", "is_best", "speedup_vs_default",
           "speedup_p20", "speedup_p80", "screen_speedup"]
# 128 tokens, one head, head_dim 32, four sparse blocks of 32: a kernel call takes ~0.1 s.
TINY = {"name": "tinytune", "dtype": "fp32", "mode": "fwd", "batch": 1, "seqlen": 128,
        "heads": 1, "kv_heads": 1, "head_dim": 32, "causal": True,
        "patterns": [{"type": "local_stride", "block_size": 32, "local_blocks": 2,
                      "vert_stride": 2, "head_sliding_offset": 1}],
        "providers": ["dkbench"], "timing": {"warmup_ms": 1, "rep_ms": 1},
        "check": {"max_tokens": 256}}


def write_spec(folder: Path, **overrides) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **overrides}, sort_keys=False))
    return path


def tune_app() -> typer.Typer:
    app = typer.Typer()
    app.command("tune")(tune)
    app.command("noop")(lambda: None)  # two commands, so "tune" stays a subcommand
    return app


@pytest.fixture
def app() -> typer.Typer:
    return tune_app()


def invoke(app: typer.Typer, *args: str) -> Result:
    return CliRunner().invoke(app, ["tune", *args])


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "tune.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def only_run_dir(out: Path) -> Path:
    dirs = list(out.iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


# -- the space and the prune rules ---------------------------------------------------------------


def problem(**kw) -> Problem:
    base = dict(kernel="fwd", block_size=64, head_dim=128, dtype=torch.bfloat16, smem_limit=None)
    return Problem(**{**base, **kw})


def test_space_from_flags_replaces_only_the_given_axes() -> None:
    space = build_space("fwd", CUDA, 64, {"block_m": (32, 64, 128), "block_n": None,
                                          "num_warps": (8,), "num_stages": None, "impl": None})
    assert space.values == {"block_m": (32, 64, 128), "block_n": (32, 64, 128),
                            "num_warps": (8,), "num_stages": (2, 3, 4),
                            "impl": ("triton", "gluon")}
    configs = space.configs()
    assert len(configs) == 3 * 3 * 1 * 3 * 2
    assert configs[0] == LaunchConfig(32, 32, 8, 2, "triton")
    assert configs[-1] == LaunchConfig(128, 128, 8, 4, "gluon")


def test_impl_axis_narrows_to_the_given_kernels() -> None:
    space = build_space("fwd", CUDA, 64, {"impl": ("triton",)})
    assert {c.impl for c in space.configs()} == {"triton"}
    # The dk/dv kernel's fused and Gluon implementations and dq's Gluon one are searched on a
    # GPU by default.
    assert build_space("bwd", CUDA, 64, {}).values["impl"] == ("triton", "fused", "gluon")
    assert build_space("dq", CUDA, 64, {}).values["impl"] == ("triton", "gluon")
    assert parse_impl_list("gluon, triton") == ("gluon", "triton")
    with pytest.raises(BadInputError, match="allowed values are triton, gluon"):
        parse_impl_list("cuda")


def test_gluon_configs_are_pruned_off_hopper_and_for_32_bit() -> None:
    gluon = LaunchConfig(128, 128, 4, 3, "gluon")
    assert prune_reason(gluon, problem(capability=(9, 0))) is None
    assert "Hopper" in prune_reason(gluon, problem(capability=(8, 0)))
    assert "Hopper" in prune_reason(gluon, problem())  # the CPU: no capability
    assert "bfloat16" in prune_reason(gluon, problem(capability=(9, 0), dtype=torch.float32))
    # 128 keys per tile is the Gluon kernel's alone with 64-key blocks.
    assert "must not exceed" in prune_reason(LaunchConfig(128, 128, 4, 3), problem())
    assert "block_m=64 must be 128" in prune_reason(LaunchConfig(64, 128, 4, 3, "gluon"),
                                                    problem(capability=(9, 0)))


def test_default_spaces_cap_block_n_and_shrink_on_cpu() -> None:
    assert build_space("fwd", CUDA, 32, {}).values["block_n"] == (32,)
    assert build_space("fwd", CUDA, 32, {}).values["block_m"] == (64, 128)
    assert build_space("bwd", CUDA, 32, {}).values["block_m"] == (32,)
    # 64-key blocks: the Gluon forward may pair them into 128-key tiles; the backward may not.
    assert build_space("fwd", CUDA, 64, {}).values["block_n"] == (32, 64, 128)
    assert build_space("bwd", CUDA, 64, {}).values["block_n"] == (32, 64)
    # The dq kernel's query tile may span sparse blocks; its kv steps may not, but for its
    # Gluon kernel's 128-key steps gathered from 64-key blocks.
    assert build_space("dq", CUDA, 32, {}).values["block_m"] == (64, 128)
    assert build_space("dq", CUDA, 32, {}).values["block_n"] == (32,)
    assert build_space("dq", CUDA, 64, {}).values["block_n"] == (32, 64, 128)
    cpu = build_space("fwd", CPU, 64, {}).values
    assert cpu == {"block_m": (16, 32), "block_n": (16, 32), "num_warps": (4,), "num_stages": (1,),
                   "impl": ("triton",)}


@pytest.mark.parametrize("text, expected", [("32,64,128", (32, 64, 128)), (" 4, 8,4 ", (4, 8))])
def test_parse_int_list(text: str, expected: tuple) -> None:
    assert parse_int_list(text, "--block-m") == expected


@pytest.mark.parametrize("text", ["32,x", "", "0,16", "-8"])
def test_parse_int_list_rejects_with_the_flag_named(text: str) -> None:
    with pytest.raises(BadInputError, match="--block-m"):
        parse_int_list(text, "--block-m")


def test_prune_rule_tile_must_fit_the_sparse_block() -> None:
    assert "must not exceed the sparse block size 64" in fits_sparse_block(
        LaunchConfig(64, 128, 4, 2), problem())
    assert "power of two" in fits_sparse_block(LaunchConfig(48, 32, 4, 2), problem())
    assert fits_sparse_block(LaunchConfig(128, 64, 4, 2), problem()) is None


def test_prune_rule_shared_memory_against_the_device_limit() -> None:
    config = LaunchConfig(128, 64, 4, 4)
    # 4 stages x (64 x 128 x 2 tensors) x 2 bytes + 128 x 128 x 2 bytes
    assert shared_memory_bytes(config, problem()) == 4 * 64 * 128 * 2 * 2 + 128 * 128 * 2
    assert "shared memory" in fits_shared_memory(config, problem(smem_limit=100 * 1024))
    assert fits_shared_memory(config, problem(smem_limit=228 * 1024)) is None
    assert fits_shared_memory(config, problem(smem_limit=None)) is None  # CPU: no such rule
    # head_dim is padded to a power of two, fp32 takes 4 bytes
    # the backward keeps two outer tiles resident
    for kernel in ("bwd", "dq"):
        assert shared_memory_bytes(config, problem(kernel=kernel)) == \
            4 * 64 * 128 * 2 * 2 + 2 * 128 * 128 * 2
    small = LaunchConfig(16, 16, 4, 1)
    assert shared_memory_bytes(small, problem(head_dim=80, dtype=torch.float32)) == \
        (16 * 128 * 2 + 16 * 128) * 4


def test_prune_rule_the_kernel_rejects() -> None:
    # Tile shapes the kernel's static asserts reject, checked without config_problems.
    assert "divide the block size" in kernel_accepts(LaunchConfig(64, 48, 4, 2), problem())
    assert "divide or be a multiple" in kernel_accepts(LaunchConfig(96, 32, 4, 2), problem())
    assert kernel_accepts(LaunchConfig(256, 64, 4, 2), problem()) is None
    # The backward's own rule (kernels.configs): its block_m stays inside one sparse block.
    bwd = problem(kernel="bwd")
    assert "for the backward" in fits_sparse_block(LaunchConfig(128, 64, 4, 2), bwd)
    assert fits_sparse_block(LaunchConfig(128, 64, 4, 2), problem()) is None
    assert fits_sparse_block(LaunchConfig(128, 64, 4, 2), problem(kernel="dq")) is None
    assert "must not exceed" in fits_sparse_block(LaunchConfig(64, 128, 4, 2), problem(kernel="dq"))


def test_plan_measures_the_default_first_even_when_outside_the_space(monkeypatch) -> None:
    # On a Hopper GPU the forward's default would be the Gluon config; this is about Triton's.
    monkeypatch.setattr(kernels.configs, "gluon_default_applies", lambda *args: False)
    space = build_space("fwd", CUDA, 64, {"block_m": (64,), "block_n": (32, 128),
                                          "num_warps": (4,), "num_stages": (2, 8)})
    cands = plan_candidates(space, problem(smem_limit=100 * 1024), CUDA)
    assert cands.default == LaunchConfig(128, 64, 4, 2)  # kernels.configs.default_config
    assert cands.run[0] == cands.default and cands.default not in space.configs()
    assert cands.run[1:] == (LaunchConfig(64, 32, 4, 2),)
    pruned = dict(cands.pruned)
    assert "sparse block size" in pruned[LaunchConfig(64, 128, 4, 2)]
    assert "shared memory" in pruned[LaunchConfig(64, 32, 4, 8)]
    assert prune_reason(LaunchConfig(64, 32, 4, 2), problem(smem_limit=100 * 1024)) is None


def test_sweep_from_flags_uses_defaults_and_flags(tmp_path: Path) -> None:
    sweep = sweep_from_flags(CPU, "fwd", seqlen=128, heads=2, kv_heads=None, head_dim=None,
                             dtype=None, batch=None, block_size=None, local_blocks=None,
                             vert_stride=None)
    (case,) = expand(sweep)
    assert (case.seqlen, case.heads, case.kv_heads, case.head_dim, case.dtype) == \
        (128, 2, CPU_SHAPE["kv_heads"], CPU_SHAPE["head_dim"], "float32")
    assert case.pattern.type == "local_stride" and case.pattern.head_sliding_offset == 1
    gpu = expand(sweep_from_flags(CUDA, "fwd"))[0]
    assert (gpu.seqlen, gpu.heads, gpu.kv_heads, gpu.head_dim, gpu.dtype, gpu.block_size) == \
        (GPU_SHAPE["seqlen"], 32, 8, 128, "bfloat16", 64)
    with pytest.raises(Exception, match="kv_heads"):
        sweep_from_flags(CPU, "fwd", heads=3, kv_heads=2)


# -- the command: dry run, bad input -------------------------------------------------------------


@needs_interpreter  # --device cpu
def test_dry_run_lists_candidates_and_pruned_without_running(
        app: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise AssertionError("a dry run must not prepare or run anything")

    monkeypatch.setattr(runner, "prepare_one", boom)
    monkeypatch.setattr(precompile.Compiler, "run", boom)
    monkeypatch.setattr(bundled, "sparse_attention", boom)
    result = invoke(app, "--dry-run", "--device", "cpu", "--seqlen", "128", "--heads", "1",
                    "--kv-heads", "1", "--block-m", "16,32", "--block-n", "32,64",
                    "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "m32n32w4s1" in result.output and "default" in result.output
    assert "m16n32w4s1" in result.output
    assert "m16n64w4s1" in result.output and "pruned" in result.output
    assert "exceed the sparse" in result.output
    assert "2 to run, 2 pruned" in result.output
    assert not (tmp_path / "out").exists()


def test_spec_and_shape_flags_together_is_bad_input(app: typer.Typer, tmp_path: Path) -> None:
    result = invoke(app, str(write_spec(tmp_path)), "--seqlen", "64", "--dry-run")
    assert result.exit_code == 2, result.output
    assert "not both" in result.output


@needs_interpreter  # --device cpu
@pytest.mark.parametrize("mode", ["bwd", "fwd_bwd"])
def test_backward_modes_need_the_backward_kernel(app: typer.Typer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 mode: str) -> None:
    monkeypatch.setitem(sys.modules, "kernels.bwd", None)  # import fails, as before it exists
    result = invoke(app, str(write_spec(tmp_path)), "--mode", mode, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "the backward kernel is not available yet" in result.output


# -- failures per candidate (fake kernel and timer: fast, and the timings are chosen) ------------

# Fake times by block_m: block_m 16 would be the fastest if it ran ok.
FAKE_MS = {16: 0.5, 32: 2.0, 64: 1.0}


class Timed:
    """A step as the fake timers see it: the candidate's name (its config), and its block_m."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.block_m = int(re.match(r"m(\d+)n", name)[1])


def fake_timers(monkeypatch: pytest.MonkeyPatch, calls: list[dict], alone, together) -> None:
    """The runner's timers replaced: ``together(steps, baseline)`` with a `Timed` per step, and
    ``alone(step)``, the step named by the config of the kernel call it makes."""
    def measure(fn, timing, device):
        fn()
        return alone(Timed(calls[-1]["config"].short()))

    def measure_interleaved(steps, timing, device, baseline=None, **kw):
        return together([Timed(name) for name in steps], baseline)

    monkeypatch.setattr(runner, "measure", measure)
    monkeypatch.setattr(runner, "measure_interleaved", measure_interleaved)


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch):
    """The bundled kernel replaced by the reference; the timer by FAKE_MS; records the calls."""
    calls: list[dict] = []

    def attention(q, k, v, layout, sm_scale=None, seq_dim=1, config=None, bwd_config=None,
                  dq_config=None):
        calls.append({"config": config, "bwd_config": bwd_config, "dq_config": dq_config})
        out = reference_attention(q, k, v, layout, sm_scale=sm_scale, seq_dim=seq_dim,
                                  grad=q.requires_grad)
        return out.to(q.dtype)

    def fake(ready):
        ms = FAKE_MS[ready.block_m]
        return Measurement(ms, ms * 0.9, ms * 1.1, "fake", 3)

    def together(ready, baseline):
        times = {r.name: fake(r) for r in ready}
        ratios = {name: Ratio(*[times[baseline].ms / t.ms] * 3, 3) for name, t in times.items()
                  if baseline is not None and name != baseline}
        return Interleaved(times, ratios, {}, [])

    monkeypatch.setattr(bundled, "sparse_attention", attention)
    fake_timers(monkeypatch, calls, fake, together)
    return calls


def tune_spec(tmp_path: Path, mode: str = "fwd", cache: Path | None = None,
              interleave: bool = True, progress=None, **spec):
    path = write_spec(tmp_path, timing={**TINY["timing"], "interleave": interleave}, **spec)
    sweep = load_spec(path)
    overrides = {"block_m": (16, 32, 64), "block_n": (32,), "num_warps": (4,), "num_stages": (1,)}
    jobs = plan_tune(sweep, (mode,), CPU, overrides)
    return tuning.execute_tune(sweep, path.read_text(), jobs, CPU, tmp_path / "out",
                               cache or tmp_path / "cache.json", progress)


@pytest.fixture
def phases(monkeypatch: pytest.MonkeyPatch, fake_kernel) -> list[tuple]:
    """What a tune did, in order: ``("compile", tasks, calls, checks)`` for each batch its
    compile pool ran, ``("time", kernel, calls, checks)`` for each (case, kernel) it timed; with
    the kernel calls (``fake_kernel``'s records) and the checks (the configs each one pinned)
    each made."""
    log: list[tuple] = []
    checks: list[object] = []
    real_check, real_pool, real_tune_kernel = runner.run_check, tuning.compile_pool, \
        tuning.tune_kernel

    def check(provider, prepared, *args):
        checks.append(prepared.launch_config)
        return real_check(provider, prepared, *args)

    def watched(phase: str, what: object, run):
        calls, checked = len(fake_kernel), len(checks)
        got = run()
        log.append((phase, what, fake_kernel[calls:], checks[checked:]))
        return got

    @contextmanager
    def compile_pool(*args):
        with real_pool(*args) as pool:
            compile = pool.compile
            pool.compile = lambda tasks, on_done: watched(
                "compile", list(tasks), lambda: compile(tasks, on_done))
            yield pool

    def tune_kernel(job, cands, *args):
        return watched("time", cands.kernel, lambda: real_tune_kernel(job, cands, *args))

    monkeypatch.setattr(runner, "run_check", check)
    monkeypatch.setattr(tuning, "compile_pool", compile_pool)
    monkeypatch.setattr(tuning, "tune_kernel", tune_kernel)
    return log


@pytest.mark.parametrize("interleave", [True, False])
def test_failing_candidate_is_recorded_and_does_not_win(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel, interleave: bool) -> None:
    from triton.runtime.errors import OutOfResources

    real = bundled.sparse_attention

    def failing(q, k, v, layout, config=None, **kw):
        if config.block_m == 16:
            raise RuntimeError("PassManager::run failed\nlong compiler log")
        if config.block_m == 64:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return real(q, k, v, layout, config=config, **kw)

    monkeypatch.setattr(bundled, "sparse_attention", failing)
    outcome = tune_spec(tmp_path, interleave=interleave)
    rows = {int(r["block_m"]): r for r in read_rows(outcome.run_dir)}
    assert rows[16]["status"] == "error"
    assert rows[16]["message"] == "RuntimeError: PassManager::run failed"
    assert rows[64]["status"] == "oom" and "OutOfResources" in rows[64]["message"]
    assert [m for m, r in rows.items() if r["is_best"] == "True"] == [32]
    assert ConfigCache(tmp_path / "cache.json").get(outcome.writes[0].key)["block_m"] == 32


@pytest.mark.parametrize("interleave", [True, False])
def test_wrong_candidate_cannot_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    fake_kernel, interleave: bool) -> None:
    real_check = runner.run_check

    def check(provider, prepared, *args):
        if prepared.launch_config.block_m == 16:
            return CheckResult(1.0, 0.5, False, "out")
        return real_check(provider, prepared, *args)

    monkeypatch.setattr(runner, "run_check", check)
    outcome = tune_spec(tmp_path, interleave=interleave)
    rows = {int(r["block_m"]): r for r in read_rows(outcome.run_dir)}
    assert rows[16]["status"] == "wrong" and "relative error 0.5" in rows[16]["message"]
    assert rows[16]["ms"] == "nan"  # never timed
    assert rows[64]["is_best"] == "True" and rows[16]["is_best"] == "False"
    assert float(rows[64]["speedup_vs_default"]) == pytest.approx(2.0)  # default m32: 2.0 ms
    (write,) = outcome.writes
    assert write.config == LaunchConfig(64, 32, 4, 1)
    assert (write.ms, write.default_ms) == (1.0, 2.0)


def test_interleaved_tune_picks_by_the_paired_ratio_and_times_all_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel) -> None:
    # m64 has the lower median ms, but paired with the default round by round m16 gains more:
    # a drift that slowed m16's rounds moved its median, not its ratios.
    seen = []

    def together(ready, baseline):
        seen.append(([r.name for r in ready], baseline))
        times = {"m32n32w4s1": Measurement(2.0, 1.9, 2.1, "fake", 9),
                 "m16n32w4s1": Measurement(1.5, 1.0, 3.0, "fake", 9),
                 "m64n32w4s1": Measurement(1.2, 1.1, 1.3, "fake", 9)}
        ratios = {"m16n32w4s1": Ratio(1.9, 1.8, 2.0, 3), "m64n32w4s1": Ratio(1.6, 1.5, 1.7, 3)}
        return Interleaved(times, ratios, {}, [])

    fake_timers(monkeypatch, fake_kernel, None, together)  # nothing is timed on its own
    outcome = tune_spec(tmp_path)
    assert seen == [(["m32n32w4s1", "m16n32w4s1", "m64n32w4s1"], "m32n32w4s1")]
    rows = {int(r["block_m"]): r for r in read_rows(outcome.run_dir)}
    assert [m for m, r in rows.items() if r["is_best"] == "True"] == [16]
    assert float(rows[16]["speedup_vs_default"]) == pytest.approx(1.9)
    assert float(rows[64]["speedup_vs_default"]) == pytest.approx(1.6)
    assert float(rows[32]["speedup_vs_default"]) == 1.0
    assert [r.config.block_m for r in outcome.results[0].ranked()] == [16, 64, 32]


@pytest.mark.parametrize("interleave", [True, False])
def test_a_config_within_the_noise_does_not_replace_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel, interleave: bool) -> None:
    # m64's median is 0.2% faster than the default's (a tie seen on the H100); m16 is slower.
    times = {"m32n32w4s1": Measurement(2.000, 1.98, 2.02, "fake", 9),
             "m16n32w4s1": Measurement(2.500, 2.40, 2.60, "fake", 9),
             "m64n32w4s1": Measurement(1.996, 1.97, 2.03, "fake", 9)}
    ratios = {"m16n32w4s1": Ratio(0.80, 0.78, 0.82, 3), "m64n32w4s1": Ratio(1.002, 0.99, 1.01, 3)}
    fake_timers(monkeypatch, fake_kernel, lambda ready: times[ready.name],
                lambda ready, baseline: Interleaved({r.name: times[r.name] for r in ready},
                                                    ratios, {}, []))
    outcome = tune_spec(tmp_path, interleave=interleave)
    (result,) = outcome.results
    assert result.best is result.default and result.default_kept
    assert [r.config.block_m for r in result.ranked()] == [32, 64, 16]  # the winner first
    rows = {int(r["block_m"]): r for r in read_rows(outcome.run_dir)}
    assert rows[32]["is_best"] == "True" and rows[64]["is_best"] == "False"
    paired = float(rows[64]["speedup_p20"])
    assert paired == pytest.approx(0.99) if interleave else math.isnan(paired)
    assert outcome.writes[0].config == LaunchConfig(32, 32, 4, 1)


def _tuned_with_paired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel,
                      times: dict, ratios: dict, **spec):
    """A tune of the three-config space whose interleaved timing gives ``times`` and ``ratios``."""
    fake_timers(monkeypatch, fake_kernel, None,
                lambda ready, baseline: Interleaved({r.name: times[r.name] for r in ready},
                                                    ratios, {}, []))
    return tune_spec(tmp_path, **spec)


def test_a_paired_win_whose_median_is_slower_does_not_replace_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel) -> None:
    """Was (an H200 tune): four rounds of five faster by their paired ratios (p20 1.0004), yet
    a median 0.2% slower than the default's; cached, the entry's ms lost to its default_ms."""
    times = {"m32n32w4s1": Measurement(10.489, 10.40, 10.60, "fake", 9),
             "m16n32w4s1": Measurement(12.000, 11.90, 12.10, "fake", 9),
             "m64n32w4s1": Measurement(10.508, 10.42, 10.61, "fake", 9)}
    ratios = {"m16n32w4s1": Ratio(0.87, 0.86, 0.88, 3),
              "m64n32w4s1": Ratio(1.0012, 1.0004, 1.01, 3)}
    outcome = _tuned_with_paired(tmp_path, monkeypatch, fake_kernel, times, ratios)
    (result,) = outcome.results
    assert result.best is result.default and result.default_kept
    assert outcome.writes[0].config == LaunchConfig(32, 32, 4, 1)


def test_cases_that_share_a_key_keep_the_default_when_no_config_won_any(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel) -> None:
    """Was: seqlen 120 and 128 share a cache key; m64 is within the noise in both (the default
    is_best in each case's rows), yet its geometric-mean speedup of 1.002 put it in the cache."""
    times = {"m32n32w4s1": Measurement(2.000, 1.98, 2.02, "fake", 9),
             "m16n32w4s1": Measurement(2.500, 2.40, 2.60, "fake", 9),
             "m64n32w4s1": Measurement(1.996, 1.97, 2.03, "fake", 9)}
    ratios = {"m16n32w4s1": Ratio(0.80, 0.78, 0.82, 3), "m64n32w4s1": Ratio(1.002, 0.99, 1.01, 3)}
    outcome = _tuned_with_paired(tmp_path, monkeypatch, fake_kernel, times, ratios,
                                 seqlen=[120, 128])
    assert len({r.key for r in outcome.results}) == 1  # one bucket
    assert all(r.best is r.default for r in outcome.results)
    (write,) = outcome.writes
    assert write.config == LaunchConfig(32, 32, 4, 1)
    cached = ConfigCache(tmp_path / "cache.json").get(write.key)
    assert LaunchConfig.from_dict(cached) == LaunchConfig(32, 32, 4, 1)


def test_interleaved_tune_records_a_failure_while_timed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel) -> None:
    def together(ready, baseline):
        times = {r.name: Measurement(2.0, 1.9, 2.1, "fake", 9) for r in ready
                 if r.name != "m16n32w4s1"}
        return Interleaved(times, {"m64n32w4s1": Ratio(1.1, 1.05, 1.2, 3)},
                           {"m16n32w4s1": torch.cuda.OutOfMemoryError("out of memory")}, [])

    fake_timers(monkeypatch, fake_kernel, None, together)
    rows = {int(r["block_m"]): r for r in read_rows(tune_spec(tmp_path).run_dir)}
    assert rows[16]["status"] == "oom" and rows[16]["ms"] == "nan"
    assert rows[64]["is_best"] == "True" and rows[32]["message"] == "default config (reference)"


def test_fwd_bwd_tunes_each_kernel_behind_the_winners_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel, phases) -> None:
    outcome = tune_spec(tmp_path, mode="fwd_bwd")
    rows = read_rows(outcome.run_dir)
    assert {r["kernel"] for r in rows} == {"fwd", "bwd", "dq"}
    for kernel in ("fwd", "bwd", "dq"):
        best = [r for r in rows if r["kernel"] == kernel and r["is_best"] == "True"]
        assert len(best) == 1 and best[0]["block_m"] == "16"
    winner = LaunchConfig(16, 32, 4, 1)  # of every kernel: FAKE_MS favours block_m 16
    timed = [call for phase, _, calls, _ in phases if phase == "time" for call in calls]
    # The dk/dv kernel behind the forward winner, the dq config looked up (None here).
    dkdv_calls = [c for c in timed if c["bwd_config"] is not None and c["dq_config"] is None]
    assert dkdv_calls and all(c["config"] == winner for c in dkdv_calls)
    assert {c["bwd_config"].block_m for c in dkdv_calls} == {16, 32}
    (pruned,) = [r for r in rows if r["kernel"] == "bwd" and r["block_m"] == "64"]
    assert pruned["status"] == "unsupported" and "for the backward" in pruned["message"]
    # The dq kernel behind both winners; its tile may span sparse blocks (64 over blocks of 32).
    dq_calls = [c for c in timed if c["dq_config"] is not None]
    assert dq_calls and all(c["config"] == winner and c["bwd_config"] == winner
                            for c in dq_calls)
    assert {c["dq_config"].block_m for c in dq_calls} == {16, 32, 64}
    assert sorted(w.key.kernel for w in outcome.writes) == ["bwd", "dq", "fwd"]


# -- the compile phase: one batch before anything is timed; its outcomes where the pins match ---

DEFAULT = LaunchConfig(32, 32, 4, 1)  # the CPU's default of every kernel of these cases


def test_every_candidate_compiles_in_one_batch_before_anything_is_timed(
        tmp_path: Path, fake_kernel, phases) -> None:
    heard = []
    outcome = tune_spec(tmp_path, mode="fwd_bwd", seqlen=[128, 256],
                        progress=lambda *a: heard.append(a))
    assert [phase for phase, *_ in phases] == ["compile"] + ["time"] * 6
    assert [kernel for _, kernel, *_ in phases[1:]] == ["fwd", "bwd", "dq"] * 2  # two cases
    ((_, batch, calls, _),) = [p for p in phases if p[0] == "compile"]
    # Every candidate of every case and kernel, in the jobs' order: case by case, each kernel's
    # candidates as planned (the default first), the pruned ones left out.
    assert [(t.case.seqlen, t.kernel, t.name) for t in batch] == [
        (result.case.seqlen, result.kernel, row.config.short()) for result in outcome.results
        for row in result.rows if row.status != "unsupported"]
    assert len(batch) == 2 * (3 + 2 + 3)
    # Each behind the defaults of the kernels before it (the forward's winner is block_m 16).
    for task in batch:
        config = LaunchConfig(Timed(task.name).block_m, 32, 4, 1)
        before = {"fwd": {}, "bwd": {"fwd": DEFAULT}, "dq": {"fwd": DEFAULT, "bwd": DEFAULT}}
        assert task.pin == {**before[task.kernel], task.kernel: config}
        assert task.case.mode == ("fwd" if task.kernel == "fwd" else "bwd")
    assert calls and all(c["config"] == DEFAULT for c in calls if c["bwd_config"] is not None)
    # The compile bar counts each candidate once; the timing's steps add up to its total.
    compiled = [(done, total) for phase, _, done, total in heard if phase == "compile"]
    assert compiled[-1] == (len(batch), len(batch))
    assert [done for done, _ in compiled[1:]] == list(range(1, len(batch) + 1))
    steps = [(done, total) for phase, text, done, total in heard if phase == "time"]
    assert steps[-1] == (len(batch) + 6, len(batch) + 6)  # the candidates and six timings
    assert steps[-2][0] == steps[-1][0] - 1


def only_behind_the_default_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dk/dv candidate block_m 16 fails behind the default forward, and only there."""
    real = bundled.sparse_attention

    def attention(q, k, v, layout, config=None, bwd_config=None, dq_config=None, **kw):
        if config == DEFAULT and bwd_config is not None and bwd_config.block_m == 16:
            raise RuntimeError("fails behind the default forward")
        return real(q, k, v, layout, config=config, bwd_config=bwd_config, dq_config=dq_config,
                    **kw)

    monkeypatch.setattr(bundled, "sparse_attention", attention)


def test_a_compile_outcome_is_not_taken_behind_other_winners(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel, phases) -> None:
    # FAKE_MS makes block_m 16 the forward's winner, not its default: the backward's candidates
    # are timed behind other pins than those they compiled behind.
    only_behind_the_default_forward(monkeypatch)
    heard = []
    outcome = tune_spec(tmp_path, mode="fwd_bwd", progress=lambda *a: heard.append(a))
    checks = {what: checked for phase, what, _, checked in phases if phase == "time"}
    (compile_checks,) = [checked for phase, _, _, checked in phases if phase == "compile"]
    assert len(compile_checks) == 3 + 2 + 3  # each candidate once (the failing one raised in it)
    winner = LaunchConfig(16, 32, 4, 1)
    assert checks["fwd"] == []  # the forward's pins are its own: its checks are taken
    # The backward's: checked again behind the winners, each candidate once.
    assert checks["bwd"] == [{"fwd": winner, "bwd": c} for c in (DEFAULT, winner)]
    assert checks["dq"] == [{"fwd": winner, "bwd": winner, "dq": LaunchConfig(m, 32, 4, 1)}
                            for m in (32, 16, 64)]
    # The failure behind the default forward is not this candidate's behind the winner.
    rows = {(r["kernel"], r["block_m"]): r for r in read_rows(outcome.run_dir)}
    assert rows["bwd", "16"]["status"] == "ok" and rows["bwd", "16"]["is_best"] == "True"
    steps = [(done, total) for phase, text, done, total in heard if phase == "time"]
    assert steps[-2] == (steps[-1][0] - 1, steps[-1][1]) == (3 + 2 + 3 + 3 - 1, 11)


def test_a_compile_outcome_is_taken_behind_the_default_winners(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel, phases) -> None:
    # The default (block_m 32) is now the fastest of every kernel: each kernel is timed behind
    # the pins it compiled behind, so its checks and failures come from the compile phase.
    monkeypatch.setitem(FAKE_MS, 32, 0.25)
    only_behind_the_default_forward(monkeypatch)
    heard = []
    outcome = tune_spec(tmp_path, mode="fwd_bwd", progress=lambda *a: heard.append(a))
    assert [checked for phase, _, _, checked in phases if phase == "time"] == [[], [], []]
    rows = {(r["kernel"], r["block_m"]): r for r in read_rows(outcome.run_dir)}
    assert all(rows[k, "32"]["is_best"] == "True" for k in ("fwd", "bwd", "dq"))
    failed = rows["bwd", "16"]
    assert failed["status"] == "error" and failed["ms"] == "nan"
    assert failed["message"] == "RuntimeError: fails behind the default forward"
    assert all(r["status"] in ("ok", "unsupported") for key, r in rows.items()
               if key != ("bwd", "16"))
    # The failure taken counts as its step: not prepared again, the steps still add up.
    steps = [(done, total) for phase, text, done, total in heard if phase == "time"]
    assert steps[-2] == (steps[-1][0] - 1, steps[-1][1]) == (10, 11)
    assert sum(text != "done" for phase, text, *_ in heard if phase == "time") == 11 - 1


# -- end to end on the CPU interpreter: tune, then run reads the cache ---------------------------


@needs_interpreter
def test_tiny_tune_writes_csv_and_cache_that_run_uses(app: typer.Typer, tmp_path: Path,
                                                      cache_env: Path) -> None:
    spec = write_spec(tmp_path)
    out = tmp_path / "results"
    result = invoke(app, str(spec), "--device", "cpu", "--block-m", "32,64", "--block-n", "32",
                    "--cache", str(cache_env), "--out", str(out), "--top", "2")
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(out)
    assert run_dir.name.startswith("tune-tinytune-")
    # Where the time went, per phase: in meta.json and the command's last line. In the
    # interpreter the candidates "compile" in this process, one candidate at a time.
    meta = json.loads((run_dir / "meta.json").read_text())
    seconds = meta["seconds"]
    assert set(seconds) == {"compile", "prepare", "final", "wall"}  # two candidates: no screen
    # And each candidate's compile run, per case and kernel.
    (per_kernel,) = meta["compile_seconds"].values()
    assert set(per_kernel) == {"m32n32w4s1", "m64n32w4s1"}, per_kernel
    assert all(0 <= s <= seconds["compile"] + 0.01 for s in per_kernel.values())
    assert all(value >= 0 for value in seconds.values())
    assert sum(seconds.values()) - seconds["wall"] <= seconds["wall"] + 0.03  # each to 0.01 s
    assert re.search(r"Took \d+ s: compile \d+ s, prepare and check \d+ s, final timing \d+ s, "
                     r"the rest \d+ s\.", " ".join(result.stdout.split())), result.output
    with open(run_dir / "tune.csv", newline="") as fh:
        assert next(csv.reader(fh)) == COLUMNS
    rows = read_rows(run_dir)
    assert {(int(r["block_m"]), int(r["block_n"])) for r in rows} == {(32, 32), (64, 32)}
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in rows), rows
    best = [r for r in rows if r["is_best"] == "True"]
    assert len(best) == 1
    default = next(r for r in rows if r["block_m"] == "32")
    assert float(default["speedup_vs_default"]) == pytest.approx(1.0)
    winner = LaunchConfig(int(best[0]["block_m"]), int(best[0]["block_n"]),
                          int(best[0]["num_warps"]), int(best[0]["num_stages"]))

    entries = ConfigCache(cache_env).entries()
    (entry,) = entries.values()
    assert entry["key"]["gpu"] == "cpu (triton interpreter)" and entry["key"]["kernel"] == "fwd"
    assert entry["config"] == winner.as_dict()

    sweep = load_spec(spec)
    plan = runner.plan_run(sweep, expand(sweep), ["dkbench"], tmp_path / "run", None)
    (row,) = runner.execute(sweep, spec.read_text(), plan, CPU)
    assert row.status == "ok", row.message
    assert (row.config_source, row.config) == ("cache", winner.short())


@needs_interpreter
@pytest.mark.parametrize("owned", [False, True], ids=["union", "owned steps"])
def test_tiny_fwd_bwd_tune_caches_every_kernel(tmp_path: Path, cache_env: Path, owned: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if owned:  # a pattern of owned steps (the interpreter's small blocks never make one)
        def form(kernel, layout, seq_k):
            return "owned" if kernel in select.OWNED_STEP_BOXES else "union"

        monkeypatch.setattr(select, "step_form", form)  # the tune's key and the lookup's
    spec = write_spec(tmp_path, mode="fwd_bwd")
    sweep = load_spec(spec)
    overrides = {"block_m": (32,), "block_n": (16, 32), "num_warps": (4,), "num_stages": (1,)}
    jobs = plan_tune(sweep, ("fwd_bwd",), CPU, overrides)
    outcome = tuning.execute_tune(sweep, spec.read_text(), jobs, CPU, tmp_path / "out", cache_env)
    rows = read_rows(outcome.run_dir)
    for kernel in ("fwd", "bwd", "dq"):
        mine = [r for r in rows if r["kernel"] == kernel]
        assert len(mine) == 2 and all(r["status"] == "ok" for r in mine), mine
        assert sum(r["is_best"] == "True" for r in mine) == 1
    (case,) = expand(sweep)
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    probe = torch.empty(1, 1, 1, case.head_dim)
    for write in outcome.writes:
        found = select.resolve_config(write.key.kernel, probe, layout, case.seqlen)
        assert found == (write.config, "cache")
    assert sorted(w.key.kernel for w in outcome.writes) == ["bwd", "dq", "fwd"]
    # Each entry under the step form its kernel takes this pattern in.
    assert {w.key.kernel: w.key.steps for w in outcome.writes} == (
        {"fwd": "owned", "dq": "owned", "bwd": "union"} if owned
        else dict.fromkeys(("fwd", "dq", "bwd"), "union"))
