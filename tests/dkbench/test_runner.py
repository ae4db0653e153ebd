"""The runner on tiny specs on the CPU: every case x provider becomes one row, whatever happens."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dkbench.errors import BadInputError
from dkbench.measure import runner, timing
from dkbench.measure.check import check_case, check_layout
from dkbench.measure.providers import PROVIDERS
from dkbench.measure.providers.bundled import BundledKernel, _describe
from dkbench.measure.providers.sdpa import SdpaMath
from dkbench.results.schema import COLUMNS, ResultRow, read_results
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand

from .clocks import ScriptedClock, drift_once
from .specs import needs_interpreter, write_spec

CPU = torch.device("cpu")


def run_rows(tmp_path: Path, **overrides: Any) -> list[ResultRow]:
    """Load a tiny spec, run all of it on the CPU, and check the CSV holds what was returned."""
    path = write_spec(tmp_path, **overrides)
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    rows = runner.execute(sweep, path.read_text(), plan, CPU)
    frame = read_results(plan.run_dir)
    assert tuple(frame.columns) == COLUMNS
    assert list(zip(frame["case_id"], frame["provider"], frame["status"])) == [
        (r.case_id, r.provider, r.status) for r in rows]
    return rows


def statuses(rows: list[ResultRow]) -> list[tuple[int, str, str]]:
    return [(r.seqlen, r.provider, r.status) for r in rows]


# -- provider availability --

@pytest.mark.parametrize(("name", "reason"), [
    ("dkbench", None),
    ("sdpa_math", None),
    ("sdpa_flash", "the SDPA FLASH_ATTENTION backend needs a CUDA GPU"),
    ("sdpa_efficient", "the SDPA EFFICIENT_ATTENTION backend needs a CUDA GPU"),
    ("sdpa_cudnn", "the SDPA CUDNN_ATTENTION backend needs a CUDA GPU"),
    ("flex", "FlexAttention is timed on CUDA GPUs only"),
    ("flex_flash", "FlexAttention is timed on CUDA GPUs only"),
    ("fa4", "FlashAttention-4 needs a CUDA GPU"),
    ("fa4_sparse", "FlashAttention-4 needs a CUDA GPU"),
])
def test_availability_on_cpu(name: str, reason: str | None) -> None:
    got = PROVIDERS[name]().unavailable(CPU)
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason), got


def test_flash_attn_unavailable_on_cpu() -> None:
    got = PROVIDERS["flash_attn"]().unavailable(CPU)
    assert got is not None and got.startswith(("the flash_attn package (FlashAttention-2/3) is "
                                               "not installed", "flash_attn needs a CUDA GPU"))


def test_unavailable_providers_become_unsupported_rows(tmp_path: Path) -> None:
    rows = run_rows(tmp_path, providers=["sdpa_flash", "sdpa_math", "flex"])
    assert statuses(rows) == [(32, "sdpa_flash", "unsupported"), (32, "sdpa_math", "ok"),
                              (32, "flex", "unsupported")]
    by_name = {r.provider: r for r in rows}
    assert by_name["sdpa_flash"].message == "the SDPA FLASH_ATTENTION backend needs a CUDA GPU"
    assert by_name["flex"].message.startswith("FlexAttention is timed on CUDA GPUs only")
    assert math.isnan(by_name["flex"].ms) and by_name["flex"].timer == ""


# -- rows that fail --

def test_provider_that_raises_becomes_an_error_row(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, *args, **kwargs):
        raise RuntimeError("kaboom\nsecond line of the traceback text")

    monkeypatch.setattr(BundledKernel, "prepare", broken)
    rows = run_rows(tmp_path, seqlen=[32, 64], providers=["dkbench", "sdpa_math"])
    assert statuses(rows) == [(32, "dkbench", "error"), (32, "sdpa_math", "ok"),
                              (64, "dkbench", "error"), (64, "sdpa_math", "ok")]
    for row in rows[0], rows[2]:
        assert row.message == "RuntimeError: kaboom"
        assert math.isnan(row.ms) and math.isnan(row.flops)
    assert all(math.isfinite(r.ms) for r in rows[1::2])


@pytest.mark.parametrize("exc", [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 torch.cuda.OutOfMemoryError("Tried to allocate 2.00 GiB")])
def test_out_of_memory_becomes_an_oom_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          exc: Exception) -> None:
    def no_memory(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(SdpaMath, "prepare", no_memory)
    (row,) = run_rows(tmp_path)
    assert row.status == "oom"
    assert "Tried to allocate 2.00 GiB" in row.message


def perturb_bundled(monkeypatch: pytest.MonkeyPatch, change) -> None:
    original = BundledKernel.prepare

    def prepare(self, *args, **kwargs):
        prepared = original(self, *args, **kwargs)
        attn = prepared.attn
        return dataclasses.replace(prepared, attn=lambda q, k, v: change(attn(q, k, v)))

    monkeypatch.setattr(BundledKernel, "prepare", prepare)


@needs_interpreter
def test_wrong_output_becomes_a_wrong_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    perturb_bundled(monkeypatch, lambda out: out * 1.1)
    rows = run_rows(tmp_path, providers=["sdpa_math", "dkbench"], baseline="sdpa_math")
    assert statuses(rows) == [(32, "sdpa_math", "ok"), (32, "dkbench", "wrong")]
    wrong = rows[1]
    assert wrong.rel_err == pytest.approx(0.1, rel=1e-3)
    assert wrong.message == f"out: relative error {wrong.rel_err:.3g} above 0.005"
    assert math.isnan(wrong.ms) and wrong.timer == ""  # a wrong kernel is never timed
    assert rows[0].rel_err < 1e-5


@needs_interpreter
def test_non_finite_output_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    perturb_bundled(monkeypatch, lambda out: torch.full_like(out, float("nan")))
    (row,) = run_rows(tmp_path, providers=["dkbench"])
    assert row.status == "wrong"
    assert row.rel_err == math.inf and row.max_abs_err == math.inf


def test_disabled_check_times_anyway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = SdpaMath.prepare

    def prepare(self, *args, **kwargs):
        prepared = original(self, *args, **kwargs)
        attn = prepared.attn
        return dataclasses.replace(prepared, attn=lambda q, k, v: attn(q, k, v) * 2)

    monkeypatch.setattr(SdpaMath, "prepare", prepare)
    (checked,) = run_rows(tmp_path / "a")
    (unchecked,) = run_rows(tmp_path / "b", check={"enabled": False})
    assert checked.status == "wrong"
    assert unchecked.status == "ok" and math.isnan(unchecked.rel_err) and unchecked.ms > 0


def test_a_check_run_already_is_taken_not_run_again(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from dkbench.measure.check import CheckResult, random_inputs
    from dkbench.measure.envinfo import environment

    sweep = load_spec(write_spec(tmp_path))
    (case,) = expand(sweep)
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    known = CheckResult(0.25, 0.125, True, "out")
    ctx = runner.RunContext(sweep, CPU, environment(CPU), "r", None, "",
                            prechecked={"sdpa_math": known})

    def no_second_check(*args, **kwargs):
        raise AssertionError("checked again")

    monkeypatch.setattr(runner, "run_check", no_second_check)
    got = runner.prepare_one(ctx, case, "sdpa_math", layout, 1.0,
                             random_inputs(case, CPU, False, 0), 1)
    assert isinstance(got, runner.ReadyStep)
    assert (got.row.max_abs_err, got.row.rel_err) == (0.25, 0.125)
    # Another provider of the same context has no check on record: its own runs.
    got = runner.prepare_one(ctx, case, "dkbench", layout, 1.0,
                             random_inputs(case, CPU, False, 0), 1)
    assert got.status == "error" and "checked again" in got.message


@needs_interpreter
def test_bundled_backward_is_checked_and_credited(tmp_path: Path) -> None:
    fwd, bwd = run_rows(tmp_path, providers=["dkbench"], mode=["fwd", "bwd"])
    assert (fwd.status, bwd.status) == ("ok", "ok"), bwd.message
    assert bwd.rel_err < 5e-3  # dq, dk and dv against the reference's gradients
    assert bwd.flops == pytest.approx(2.5 * fwd.flops, rel=1e-15)
    assert bwd.flops < bwd.dense_tflops * bwd.ms * 1e9  # credited with kept pairs only
    # The backward row names the configs of all three kernels that ran, in launch order.
    assert bwd.config.startswith(fwd.config + ", bwd m") and ", dq m" in bwd.config
    assert fwd.config_source == bwd.config_source == "default"


def test_a_row_names_each_kernels_config_and_source() -> None:
    from kernels import LaunchConfig
    fwd, dkdv, dq = LaunchConfig(64, 32, 8, 3), LaunchConfig(64, 64, 4, 2), LaunchConfig(64, 32, 4, 2)
    assert _describe([("", fwd, "explicit"), ("bwd", dkdv, "shipped"), ("dq", dq, "default")]) == (
        "m64n32w8s3, bwd m64n64w4s2, dq m64n32w4s2", "explicit, shipped, default")
    assert _describe([("", fwd, "cache"), ("bwd", dkdv, "cache")])[1] == "cache"


# -- ok rows --

@needs_interpreter
def test_baseline_runs_first_and_gives_speedups(tmp_path: Path) -> None:
    rows = run_rows(tmp_path, heads=[2, 4], providers=["dkbench", "sdpa_math"],
                    baseline="sdpa_math")
    assert [(r.heads, r.provider, r.status) for r in rows] == [
        (2, "sdpa_math", "ok"), (2, "dkbench", "ok"), (4, "sdpa_math", "ok"), (4, "dkbench", "ok")]
    for base, other in (rows[0:2], rows[2:4]):
        assert base.speedup == 1.0 and math.isnan(base.speedup_p20)
        # timed interleaved: the median of per-round ratios (exactly checked in the tests below)
        assert 0 < other.speedup_p20 <= other.speedup <= other.speedup_p80
        assert other.baseline == base.baseline == "sdpa_math"
        assert other.config_source == "default" and other.config.startswith("m")


# -- interleaved and sequential timing --

def scripted(monkeypatch: pytest.MonkeyPatch, duration, rounds: int) -> list[ScriptedClock]:
    """Every interleaved timing gets a fresh scripted clock; returns them, one per case."""
    clocks: list[ScriptedClock] = []

    def clock(device: torch.device) -> ScriptedClock:
        clocks.append(ScriptedClock(duration, fixed_rounds=rounds))
        return clocks[-1]

    monkeypatch.setattr(timing, "default_clock", clock)
    return clocks


@needs_interpreter
def test_interleaved_speedup_is_the_median_of_paired_ratios(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # sdpa_math 2.5 ms, dkbench 1.0 ms; both double in round 2 of 5, between the round's two calls
    clocks = scripted(monkeypatch, drift_once([2.5, 1.0], at_call=5), rounds=5)
    monkeypatch.setattr(runner, "measure", None)  # the sequential timer must not run
    path = write_spec(tmp_path, providers=["dkbench", "sdpa_math"], baseline="sdpa_math")
    sweep = load_spec(path)
    (case,) = expand(sweep)
    ctx = runner.RunContext(sweep, CPU, {"gpu": "cpu", "torch": "", "triton": "", "git_sha": "",
                                         "interpreter": True}, "run", "sdpa_math", "dkbench run")
    started: list[str] = []
    base, mine = runner.run_case(ctx, case, ["sdpa_math", "dkbench"], started.append)
    assert started == ["preparing sdpa_math", "preparing dkbench",
                       "timing 2 providers interleaved"]
    assert clocks[0].order == [0, 1, 1, 0, 0, 1, 1, 0, 0, 1]  # 0: sdpa_math, prepared first
    assert (base.provider, base.status, mine.provider, mine.status) == (
        "sdpa_math", "ok", "dkbench", "ok")
    assert (base.ms, mine.ms) == (2.5, 2.0) and mine.timer == base.timer == "scripted"
    # paired ratios 2.5, 2.5, 1.25, 2.5, 2.5; the ratio of the medians would be 2.5 / 2.0
    assert mine.speedup == 2.5 and base.ms / mine.ms == 1.25
    assert (mine.speedup_p20, mine.speedup_p80) == (pytest.approx(2.25), 2.5)
    assert base.speedup == 1.0 and math.isnan(base.speedup_p20) and math.isnan(base.speedup_p80)
    assert mine.sparsity_efficiency == pytest.approx(2.5 * mine.density)


@needs_interpreter
def test_interleaved_rows_keep_provider_order_and_failures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def duration(step: int, call: int) -> float:
        if step == 1 and call >= 4:  # dkbench's third call
            raise torch.cuda.OutOfMemoryError("Tried to allocate 3.00 GiB")
        return 1.0 + step

    clocks = scripted(monkeypatch, duration, rounds=4)
    rows = run_rows(tmp_path, seqlen=[32, 48], providers=["sdpa_flash", "dkbench", "sdpa_math"],
                    baseline="sdpa_math")
    assert statuses(rows) == [(32, "sdpa_math", "ok"), (32, "sdpa_flash", "unsupported"),
                              (32, "dkbench", "oom"),
                              (48, "sdpa_math", "ok"), (48, "sdpa_flash", "unsupported"),
                              (48, "dkbench", "oom")]
    assert len(clocks) == 2  # one interleaved timing per case
    assert rows[2].message == "Tried to allocate 3.00 GiB" and math.isnan(rows[2].ms)
    assert rows[0].ms == 1.0 and rows[0].speedup == 1.0 and rows[0].timer == "scripted"


def test_the_peak_memory_calls_time_plans_the_interleaved_timing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each provider's peak-memory call (timed on a GPU) reaches the interleaved timing as its
    known time, so a slow step runs no extra call to be estimated."""
    warm = {"sdpa_math": 180.0, "dkbench": 7.0}
    prepared = iter(["sdpa_math", "dkbench"])  # the order providers are prepared in
    calls: list[str] = []

    def peak_memory(fn, device, exclude_bytes=0):
        calls.append(next(prepared))
        return timing.PeakCall(1.0, warm[calls[-1]])

    seen: dict[str, float | None] = {}
    real = runner.measure_interleaved

    def measure_interleaved(steps, spec, device, baseline=None, **kw):
        seen.update(kw["known_ms"])
        return real(steps, spec, device, baseline, **kw)

    monkeypatch.setattr(runner, "peak_memory", peak_memory)
    monkeypatch.setattr(runner, "measure_interleaved", measure_interleaved)
    rows = run_rows(tmp_path, providers=["dkbench", "sdpa_math"], baseline="sdpa_math")
    assert seen == warm and calls == ["sdpa_math", "dkbench"]
    assert [r.peak_mem_mb for r in rows] == [1.0, 1.0]


def test_interleave_off_times_each_provider_alone(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    timed: list[str] = []

    def measure(fn, spec, device):
        timed.append(spec.interleave)
        return timing.measure(fn, spec, device)

    monkeypatch.setattr(runner, "measure", measure)
    monkeypatch.setattr(runner, "measure_interleaved", None)
    rows = run_rows(tmp_path, seqlen=[32, 48], timing={"warmup_ms": 1, "rep_ms": 1,
                                                      "interleave": False})
    assert timed == [False, False]
    assert [(r.status, r.timer) for r in rows] == [("ok", "interpreter-wallclock")] * 2


def test_no_baseline_no_speedup(tmp_path: Path) -> None:
    (row,) = run_rows(tmp_path)
    assert row.baseline == "" and math.isnan(row.speedup)


def test_provider_level_exclusion_skips_rows(tmp_path: Path) -> None:
    rows = run_rows(tmp_path, seqlen=[32, 64], providers=["sdpa_math", "sdpa_flash"],
                    exclude=[{"provider": "sdpa_math", "seqlen": 64}, {"seqlen": 32, "heads": 4}])
    assert statuses(rows) == [(32, "sdpa_math", "ok"), (32, "sdpa_flash", "unsupported"),
                              (64, "sdpa_flash", "unsupported")]


@pytest.mark.parametrize(("mode", "factor"), [("bwd", 2.5), ("fwd_bwd", 3.5)])
def test_backward_modes_check_gradients_and_scale_flops(tmp_path: Path, mode: str,
                                                        factor: float) -> None:
    fwd, grad = run_rows(tmp_path, mode=["fwd", mode])
    assert (fwd.mode, grad.mode) == ("fwd", mode)
    assert fwd.status == grad.status == "ok", grad.message
    assert grad.flops == pytest.approx(factor * fwd.flops, rel=1e-15)
    assert 0 <= grad.rel_err < 1e-5


@needs_interpreter
def test_ok_row_fields(tmp_path: Path) -> None:
    (row,) = run_rows(tmp_path, seqlen=48, q_len=40, heads=4, kv_heads=2, batch=2, sm_scale=0.5,
                      seed=3)
    assert row.status == "ok", row.message
    assert (row.batch, row.seqlen, row.q_len, row.heads, row.kv_heads, row.head_dim, row.seed) == (
        2, 48, 40, 4, 2, 16, 3)
    assert row.timer == "interpreter-wallclock" and row.interpreter is True
    assert row.ms_p20 <= row.ms <= row.ms_p80
    assert row.build_ms >= 0 and row.max_abs_err < 1e-5
    # The set-up covers the prepare and more: the check and the warm-up ran a kernel each.
    assert row.setup_ms > row.build_ms
    assert row.pattern == "local_stride(bs16,l1,s2,head,off0)" and len(row.pattern_hash) == 12


# -- pieces --

def test_check_case_cuts_large_cases_down(tmp_path: Path) -> None:
    (case,) = expand(load_spec(write_spec(tmp_path, batch=4, seqlen=64)))
    assert check_case(case, 256) is case
    small = check_case(case, 32)
    assert (small.batch, small.seqlen, small.q_len) == (1, 32, 32)
    short_q = dataclasses.replace(case, q_len=40)  # offset 24 fits in 32: kept
    assert (check_case(short_q, 32).seqlen, check_case(short_q, 32).q_len) == (32, 8)


def test_a_cut_down_check_runs_the_leading_blocks_of_the_timed_pattern(tmp_path: Path) -> None:
    # A random pattern drawn again at the shorter length is another pattern: the check must run
    # the corner of the one timed.
    spec = write_spec(tmp_path, batch=1, seqlen=128, heads=2,
                      patterns=[{"type": "random", "block_size": 16, "density": 0.5, "seed": 1}])
    (case,) = expand(load_spec(spec))
    small = check_case(case, 64)
    full = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    checked = check_layout(full, small)
    assert torch.equal(checked.pattern, full.pattern[:, :4, :4])
    redrawn = case.pattern.layout(small.heads, small.kv_heads, small.seqlen, small.causal)
    assert not torch.equal(redrawn.pattern, checked.pattern)  # what the check used to run
    assert check_layout(full, case) is full  # nothing to cut


@needs_interpreter
def test_large_case_is_checked_on_a_cut_down_copy(tmp_path: Path) -> None:
    rows = run_rows(tmp_path, batch=2, seqlen=48, providers=["sdpa_math", "dkbench"],
                    check={"max_tokens": 32})
    assert [r.status for r in rows] == ["ok", "ok"], [r.message for r in rows]
    assert all(r.max_abs_err < 1e-5 for r in rows)


def test_order_providers() -> None:
    assert runner.order_providers(["a", "b", "c"], "c") == ["c", "a", "b"]
    assert runner.order_providers(["a", "b"], None) == ["a", "b"]


def test_resolve_device() -> None:
    assert runner.resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert runner.resolve_device("auto") == CPU
        with pytest.raises(BadInputError, match="--device cuda: no CUDA GPU"):
            runner.resolve_device("cuda")


def test_rate_above_gpu_peak_is_an_error(tmp_path: Path) -> None:
    sweep = load_spec(write_spec(tmp_path, providers=["sdpa_flash"]))
    (case,) = expand(sweep)
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    ctx = runner.RunContext(sweep, torch.device("cuda", 0), {}, "run", None, "dkbench run")
    row = ResultRow(**{f.name: "" for f in dataclasses.fields(ResultRow)
                       if f.default is dataclasses.MISSING})
    row.gpu, row.ms, row.density = "NVIDIA H100 80GB HBM3", 1e-9, 1.0
    runner._fill_metrics(ctx, case, SdpaMath(), layout, row)
    assert row.status == "error"
    assert "above the GPU's peak 495" in row.message  # float32 runs at half the bf16 peak
