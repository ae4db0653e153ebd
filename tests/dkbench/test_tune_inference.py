"""`dkbench tune` on inference cases: prefill_varlen tunes the varlen kernel and decode the
decoding kernel, each through the bundled provider with the candidate pinned; their winners go to
cache entries of their own, which a later `run` picks; which modes a spec tunes in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from dkbench.measure import runner
from dkbench.measure.providers import bundled
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand
from dkbench.tune.plan import plan_tune, resolve_modes
from kernels import LaunchConfig
from kernels.config_cache import ConfigCache
from tests.dkbench.specs import needs_interpreter
from tests.dkbench.test_tune import (  # noqa: F401 - app: a fixture
    TINY,
    app,
    read_rows,
)

CPU = torch.device("cpu")
# Two sequences of 32 and 24 tokens (decode: cache lengths), one head;
# timed one by one (the interpreter's timings mean nothing, interleaved ones take longer).
INFERENCE = {**TINY, "name": "tinyinfer", "mode": ["prefill_varlen", "decode"], "seqlen": 32,
             "heads": 1, "kv_heads": 1, "batch": None, "lengths": [32, 24],
             "timing": {**TINY["timing"], "interleave": False}}


def write(folder: Path, **overrides) -> Path:
    raw = {k: v for k, v in {**INFERENCE, **overrides}.items() if v is not None}
    path = folder / "infer.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def record_configs(monkeypatch: pytest.MonkeyPatch, name: str) -> list[LaunchConfig]:
    """The configs the bundled provider launches the inference entry ``name`` with."""
    seen: list[LaunchConfig] = []
    real = getattr(bundled, name)

    def entry(*args, config=None, **kwargs):
        seen.append(config)
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(bundled, name, entry)
    return seen


@needs_interpreter
def test_tune_of_varlen_and_decode_cases_caches_both_kernels_and_run_picks_them(
        app: typer.Typer, tmp_path: Path, cache_env: Path,  # noqa: F811 - fixtures
        monkeypatch: pytest.MonkeyPatch) -> None:
    varlen_calls = record_configs(monkeypatch, "sparse_attention_varlen")
    decode_calls = record_configs(monkeypatch, "sparse_attention_decode")
    spec = write(tmp_path)
    result = CliRunner().invoke(app, ["tune", str(spec), "--device", "cpu", "--block-n", "16,32",
                                      "--cache", str(cache_env), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "mode prefill_varlen, decode" in result.output
    assert "compiling" in result.output and "measuring" in result.output
    (run_dir,) = (tmp_path / "out").iterdir()
    rows = read_rows(run_dir)
    by_kernel = {k: [r for r in rows if r["kernel"] == k] for k in ("varlen", "decode")}
    assert {r["kernel"] for r in rows} == {"varlen", "decode"}
    # varlen searches the CPU space's tiles; decoding's block_m is fixed at 16 (the GQA group).
    assert {(r["block_m"], r["block_n"]) for r in by_kernel["varlen"]} == {
        ("16", "16"), ("16", "32"), ("32", "16"), ("32", "32")}
    assert {(r["block_m"], r["block_n"]) for r in by_kernel["decode"]} == {("16", "16"),
                                                                           ("16", "32")}
    assert all(r["status"] == "ok" for r in rows), rows
    # Each candidate ran with its own config pinned: compiled, checked and timed as itself.
    for kernel, calls in (("varlen", varlen_calls), ("decode", decode_calls)):
        tried = {LaunchConfig(int(r["block_m"]), int(r["block_n"]), 4, 1) for r in by_kernel[kernel]}
        assert set(calls) == tried, (kernel, calls)

    winners = {}
    for entry in ConfigCache(cache_env).entries().values():
        winners[entry["key"]["kernel"]] = LaunchConfig.from_dict(entry["config"])
    assert set(winners) == {"varlen", "decode"}
    for kernel, mine in by_kernel.items():
        (best,) = [r for r in mine if r["is_best"] == "True"]
        assert winners[kernel] == LaunchConfig(int(best["block_m"]), int(best["block_n"]), 4, 1)

    sweep = load_spec(spec)
    sweep = sweep.model_copy(update={"providers": ["dkbench"]})
    plan = runner.plan_run(sweep, expand(sweep), ["dkbench"], tmp_path / "run", None)
    ran = {row.mode: row for row in runner.execute(sweep, spec.read_text(), plan, CPU)}
    assert ran["prefill_varlen"].status == ran["decode"].status == "ok"
    assert ran["prefill_varlen"].config_source == ran["decode"].config_source == "cache"
    assert ran["prefill_varlen"].config == winners["varlen"].short()
    assert winners["decode"].short() in ran["decode"].config


def test_a_spec_tunes_its_training_modes_as_one_and_each_inference_mode(tmp_path: Path) -> None:
    assert resolve_modes(load_spec(write(tmp_path)), None) == ("prefill_varlen", "decode")
    training = load_spec(write(tmp_path, mode=["fwd", "bwd", "decode"], lengths=None, batch=2))
    assert resolve_modes(training, None) == ("fwd_bwd", "decode")
    jobs = plan_tune(training, resolve_modes(training, None), CPU, {})
    assert [(j.case.mode, [c.kernel for c in j.candidates]) for j in jobs] == [
        ("fwd_bwd", ["fwd", "bwd", "dq"]), ("decode", ["decode"])]
    assert resolve_modes(training, "fwd") == ("fwd",)
    assert [j.case.mode for j in plan_tune(training, ("fwd",), CPU, {})] == ["fwd"]


def test_an_inference_mode_without_its_cases_is_bad_input(
        app: typer.Typer, tmp_path: Path) -> None:  # noqa: F811
    spec = write(tmp_path, mode="fwd", lengths=None, batch=1)
    result = CliRunner().invoke(app, ["tune", str(spec), "--mode", "decode", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "no case to tune" in result.output and "own mode" in result.output
