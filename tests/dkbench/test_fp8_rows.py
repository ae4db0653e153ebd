"""fp8 cases in the harness: the spec's `dtype: fp8`, the bundled provider's quantise-then-run
step and its check against the dequantised reference, the peers' unsupported rows, and the
FLOP, byte and peak models of an fp8 row."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from dkbench.errors import SpecError
from dkbench.measure import metrics, runner, sol
from dkbench.measure.check import random_inputs, run_check
from dkbench.measure.providers import PROVIDERS, Unsupported, bundled_fp8
from dkbench.measure.providers.bundled import BundledKernel
from dkbench.results.schema import ResultRow
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import DEFAULT_RTOL, FP8, expand

from .specs import needs_interpreter, write_spec

CPU = torch.device("cpu")
# 4 heads over 2 kv heads, a ragged 200-token sequence: GQA, partial blocks, the causal diagonal.
FP8_SPEC = {"dtype": ["bf16", "fp8"], "seqlen": 200, "heads": 4, "kv_heads": 2, "head_dim": 32,
            "patterns": [{"type": "local_stride", "block_size": 32, "local_blocks": 2,
                          "vert_stride": 2}],
            "providers": ["dkbench", "sdpa_math"], "baseline": "sdpa_math"}


def _run(tmp_path: Path, **overrides) -> list[ResultRow]:
    path = write_spec(tmp_path, **{**FP8_SPEC, **overrides})
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    return runner.execute(sweep, path.read_text(), plan, CPU)


def test_the_spec_takes_fp8_and_lists_it_among_the_dtypes(tmp_path: Path) -> None:
    sweep = load_spec(write_spec(tmp_path, **FP8_SPEC))
    assert [c.dtype for c in expand(sweep)] == ["bfloat16", FP8]
    assert sweep.check.rtol[FP8] == DEFAULT_RTOL[FP8] == 5e-2
    with pytest.raises(SpecError, match=r"unknown dtype 'e5m2'; allowed: .*fp8, float8_e4m3fn"):
        load_spec(write_spec(tmp_path, "bad.yaml", dtype="e5m2"))


@needs_interpreter
def test_an_fp8_row_is_checked_against_its_dequantised_inputs(tmp_path: Path) -> None:
    bf16, math_bf16, fp8, math_fp8 = sorted(_run(tmp_path), key=lambda r: (r.dtype, r.provider))
    assert (bf16.dtype, fp8.dtype) == ("bfloat16", FP8)
    assert fp8.provider == "dkbench" and fp8.status == "ok", fp8.message
    # The kernel's own error (p rounded to e4m3): above a 16-bit kernel's, inside fp8's budget.
    assert 5e-3 < fp8.rel_err < DEFAULT_RTOL[FP8]
    # and how far it lies from the bf16 kernel on the same inputs (quantisation included).
    against_bf16 = float(re.fullmatch(r"relative error (\S+) against the bf16 kernel on the same "
                                      r"inputs \(rel_err: against the dequantised reference\)",
                                      fp8.message)[1])
    assert fp8.rel_err < against_bf16 < 0.1
    assert fp8.config.endswith("e4m3 per head") and fp8.build_ms > 0 and fp8.ms > 0
    assert math_bf16.status == "ok" and bf16.status == "ok"
    assert math_fp8.status == "unsupported" and "takes no float8 inputs" in math_fp8.message
    # One byte per element of q, k, v, two of the bf16 output.
    assert fp8.row_bytes < bf16.row_bytes and fp8.flops == bf16.flops


@needs_interpreter
def test_the_check_reports_the_error_against_the_bf16_kernel(tmp_path: Path) -> None:
    sweep = load_spec(write_spec(tmp_path, **{**FP8_SPEC, "dtype": "fp8"}))
    (case,) = expand(sweep)
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    provider = BundledKernel()
    prepared = provider.prepare(case, layout, sweep, CPU, 1 / math.sqrt(case.head_dim))
    checked = run_check(provider, prepared, case, layout, sweep, CPU,
                        1 / math.sqrt(case.head_dim), seed=3)
    assert checked.ok and checked.rel_err < DEFAULT_RTOL[FP8]
    # The quantisation of q, k, v counts here too: more than the kernel's own error.
    assert checked.rel_err < checked.vs_bf16 < 0.1


@needs_interpreter
def test_inputs_are_quantised_once_per_set_outside_the_timed_calls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = load_spec(write_spec(tmp_path, **{**FP8_SPEC, "dtype": "fp8"}))
    (case,) = expand(sweep)
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    calls = []
    real = bundled_fp8.quantize_fp8

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(bundled_fp8, "quantize_fp8", counted)
    prepared = BundledKernel().prepare(case, layout, sweep, CPU, 0.2)
    assert len(calls) == 1  # prepare's own, timed into build_ms
    inputs = random_inputs(case, CPU, False, 7)
    assert all(t.dtype == torch.bfloat16 for t in inputs)  # the case makes bf16 inputs
    first = prepared.attn(*inputs)
    torch.testing.assert_close(prepared.attn(*inputs), first, rtol=0, atol=0)
    assert len(calls) == 2  # once for the set, not per call
    inputs[0].mul_(2.0)  # changed in place: quantised again
    assert not torch.equal(prepared.attn(*inputs), first) and len(calls) == 3
    # The reference takes the values the kernel computes on.
    q, _, _ = prepared.reference_inputs(inputs)
    assert q.dtype == torch.float32 and q.shape == inputs[0].shape and len(calls) == 3
    assert 0 < float((q - inputs[0].float()).abs().max()) < 0.1 * float(inputs[0].abs().max())


@pytest.mark.parametrize("mode", ["decode", "prefill_varlen"])
def test_fp8_runs_the_training_modes_only(tmp_path: Path, mode: str) -> None:
    sweep = load_spec(write_spec(tmp_path, **{**FP8_SPEC, "dtype": "fp8", "mode": mode}))
    case = expand(sweep)[0]
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    with pytest.raises(Unsupported, match=f"no {mode} form yet: fp8 cases run the training "
                                          r"modes \(fwd, bwd, fwd_bwd\) only"):
        BundledKernel().prepare(case, layout, sweep, CPU, 0.2)


@needs_interpreter
@pytest.mark.parametrize("mode", ["fwd_bwd", "bwd"])
def test_an_fp8_training_row_checks_its_gradients(tmp_path: Path, mode: str) -> None:
    """The fp8 forward and backward in a grad mode: the gradients reach the bf16 inputs (straight
    through the quantisation) and are checked against the dequantised reference's."""
    rows = _run(tmp_path, dtype="fp8", mode=mode, providers=["dkbench"], baseline=None)
    (row,) = rows
    assert row.status == "ok", row.message
    assert row.mode == mode and row.dtype == FP8 and row.ms > 0 and row.build_ms > 0
    assert row.config.endswith("e4m3 per head, bwd the bf16 kernels on the dequantised inputs")
    # The worst of out, dq, dk, dv: above a 16-bit kernel's error, inside fp8's budget.
    assert 5e-3 < row.rel_err < DEFAULT_RTOL[FP8]
    # and how far the worst of them lies from the bf16 kernel's (quantisation included).
    found = re.fullmatch(r"relative error (\S+) \((out|dq|dk|dv), the worst of out, dq, dk, dv\) "
                         r"against the bf16 kernel on the same inputs \(rel_err: against the "
                         r"dequantised reference\)", row.message)
    assert found, row.message
    assert row.rel_err < float(found[1]) < 0.15


@needs_interpreter
def test_an_fp8_training_check_fails_a_wrong_gradient(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The gradient check can fail: dv off by 10% must fail the fp8 budget."""
    import kernels.fp8_train as fp8_train

    real = fp8_train.gradients

    def off(*args, **kwargs):
        dq, dk, dv = real(*args, **kwargs)
        return dq, dk, dv * 1.1

    monkeypatch.setattr(fp8_train, "gradients", off)
    sweep = load_spec(write_spec(tmp_path, **{**FP8_SPEC, "dtype": "fp8", "mode": "fwd_bwd"}))
    (case,) = expand(sweep)
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    provider = BundledKernel()
    prepared = provider.prepare(case, layout, sweep, CPU, 0.2)
    checked = run_check(provider, prepared, case, layout, sweep, CPU, 0.2, seed=3)
    assert not checked.ok and checked.what == "dv" and checked.rel_err > 0.08


@pytest.mark.parametrize("name, why", [
    ("sdpa_math", "scaled_dot_product_attention takes no float8 inputs"),
    ("flex", "FlexAttention in fp8"),
    ("flex_flash", "fp8 forward runs on Blackwell (sm100) only"),
    ("fa4", "fp8 forward runs on Blackwell (sm100) only; this GPU is sm90"),
    ("fa4_sparse", "fp8 forward runs on Blackwell (sm100) only; this GPU is sm90"),
    ("flashinfer", "measured in bf16 only"),
    ("flash_attn", "not wired into dkbench"),
])
def test_the_bf16_providers_refuse_fp8_cases_saying_why(tmp_path: Path, name: str, why: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # As on an H200: FA4's refusal names the GPU's architecture.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    sweep = load_spec(write_spec(tmp_path, **{**FP8_SPEC, "dtype": "fp8"}))
    (case,) = expand(sweep)
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    with pytest.raises(Unsupported, match=re.escape(why)):
        PROVIDERS[name]().prepare(case, layout, sweep, CPU, 0.2)


def test_fp8_rows_count_one_byte_an_input_and_twice_the_matrix_rate(tmp_path: Path) -> None:
    sweep = load_spec(write_spec(tmp_path, **FP8_SPEC))
    bf16, fp8 = expand(sweep)
    layout = bf16.pattern.layout(bf16.heads, bf16.kv_heads, bf16.seqlen, bf16.causal)
    q_elems = bf16.batch * bf16.q_len * bf16.heads * bf16.head_dim
    kv_elems = 2 * bf16.batch * sol.kept_kv_tokens(bf16, layout, 200, 200) * bf16.head_dim
    assert sol.row_bytes(bf16, layout, "pattern") == 2 * (2 * q_elems + kv_elems)
    assert sol.row_bytes(fp8, layout, "pattern") == q_elems + 2 * q_elems + kv_elems
    assert metrics.peak_tflops("NVIDIA H200", FP8) == 2 * metrics.peak_tflops("NVIDIA H200",
                                                                              "bfloat16")


@needs_interpreter
def test_a_gluon_config_where_gluon_cannot_run_names_the_kernel_that_ran(tmp_path: Path) -> None:
    """In the interpreter a spec asking for the Gluon fp8 kernel gets the Triton one, and its row
    says so rather than naming a config that never ran."""
    (row, _math) = sorted(_run(tmp_path, dtype="fp8", head_dim=64,
                               config={"block_m": 128, "block_n": 128, "num_warps": 4,
                                       "num_stages": 2, "impl": "gluon"},
                               patterns=[{"type": "local_stride", "block_size": 64,
                                          "local_blocks": 2, "vert_stride": 2}]),
                          key=lambda r: r.provider)
    assert row.provider == "dkbench" and row.status == "ok", row.message
    assert not row.config.startswith("gluon") and row.config.endswith("e4m3 per head")
    assert row.config_source == ("explicit; impl='gluon' runs on a CUDA GPU, not in the "
                                 "interpreter, the Triton kernel's default runs")


def test_every_backward_form_has_a_config_label() -> None:
    """The row's config names the backward's form: every form the kernels have, the default
    among them."""
    import kernels

    assert set(bundled_fp8._BACKWARD_FORMS) == set(kernels.FP8_BWD_IMPLS)
