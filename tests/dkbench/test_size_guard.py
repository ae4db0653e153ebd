"""`dkbench.measure.size_guard`: memory and interpreter-time estimates against hand-computed cases; the CPU
default sweep runs clean and quick."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dkbench.cli import app
from dkbench.measure import size_guard
from dkbench.measure.size_guard import (
    GIB,
    REFERENCE,
    cpu_warning,
    device_capacity_bytes,
    estimate_case_bytes,
    interpreter_estimate_s,
    too_big,
)
from dkbench.results.schema import read_results
from dkbench.spec.load import load_spec
from dkbench.spec.patterns import LocalStridePattern
from dkbench.spec.sweep import Case, expand

from .specs import needs_interpreter

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
PATTERN = LocalStridePattern(type="local_stride", block_size=64, local_blocks=16, vert_stride=8)


def case(**kw) -> Case:
    base = dict(mode="fwd", dtype="bfloat16", batch=1, seqlen=65536, q_len=65536, heads=32,
                kv_heads=8, head_dim=128, causal=True, pattern=PATTERN, sm_scale=None, seed=0)
    return Case(**{**base, **kw})


def capacity(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(size_guard, "device_capacity_bytes", lambda device: nbytes)


# -- memory --

def test_training_tensors_and_their_gradients():
    # q and the output: 32 x 65536 x 128 = 2**28 elements each; k and v: 8 heads, 2**26 each.
    fwd = case()
    assert estimate_case_bytes(fwd, "dkbench") == (2 * 2**28 + 2 * 2**26) * 2  # 1.25 GiB of bf16
    # bwd and fwd_bwd hold dq, dk, dv and the output's gradient as well: twice the bytes.
    for mode in ("bwd", "fwd_bwd"):
        assert estimate_case_bytes(replace(fwd, mode=mode), "dkbench") == int(2.5 * GIB)
    assert estimate_case_bytes(fwd, None) == estimate_case_bytes(fwd, "flex")


def test_an_fp8_case_counts_its_bf16_inputs_and_their_e4m3_copies():
    fwd = case()
    fp8 = replace(fwd, dtype="float8_e4m3fn")
    # The bf16 tensors of the bf16 case, and one byte an element of q, k and v beside them.
    assert estimate_case_bytes(fp8, "dkbench") == (estimate_case_bytes(fwd, "dkbench")
                                                   + 2**28 + 2 * 2**26)


def test_sdpa_math_and_the_reference_add_the_fp32_score_matrix():
    c = case(batch=8, seqlen=8192, q_len=8192)  # phi3's 8k case: 65,536 tokens
    tensors = (2 * 8 * 32 * 8192 * 128 + 2 * 8 * 8 * 8192 * 128) * 2
    scores = 8 * 32 * 8192 * 8192 * 4  # 64 GiB
    assert estimate_case_bytes(c, "sdpa_cudnn") == tensors == int(1.25 * GIB)
    assert estimate_case_bytes(c, "sdpa_math") == tensors + scores == int(65.25 * GIB)
    assert estimate_case_bytes(c, REFERENCE) == tensors + scores


def test_short_queries_fp32():
    c = case(dtype="float32", batch=2, seqlen=256, q_len=64, heads=4, kv_heads=4, head_dim=32)
    q, kv = 2 * 4 * 64 * 32, 2 * 4 * 256 * 32
    assert estimate_case_bytes(c, "dkbench") == (2 * q + 2 * kv) * 4 == 655_360
    assert estimate_case_bytes(c, "sdpa_math") == 655_360 + 2 * 4 * 64 * 256 * 4


def test_inference_modes():
    decode = case(mode="decode", dtype="float16", batch=4, seqlen=1000, q_len=1, heads=8,
                  kv_heads=2, head_dim=64, lengths=(1000, 900, 800, 700))
    # q and the output (4, 8, 64); the k and v caches (4, 1000, 2, 64).
    assert estimate_case_bytes(decode, "dkbench") == (2 * 4 * 8 * 64 + 2 * 4 * 1000 * 2 * 64) * 2
    assert estimate_case_bytes(decode, "sdpa_math") - estimate_case_bytes(decode, "dkbench") == (
        4 * 8 * 1 * 1000 * 4)
    varlen = case(mode="prefill_varlen", dtype="float16", batch=2, seqlen=100, q_len=100, heads=2,
                  kv_heads=1, head_dim=16, lengths=(100, 50))
    # Packed q, output (150, 2, 16), k, v (150, 1, 16); padded q (2, 2, 100, 16), k, v (2, 1, ...).
    packed = 2 * 150 * 2 * 16 + 2 * 150 * 1 * 16
    padded = 2 * 2 * 100 * 16 + 2 * 2 * 1 * 100 * 16
    assert estimate_case_bytes(varlen, "dkbench") == (packed + padded) * 2 == 54_400
    # The reference runs one sequence at a time: scores of the longest only.
    assert estimate_case_bytes(varlen, REFERENCE) == 54_400 + 2 * 100 * 100 * 4


def test_too_big_names_the_need_and_the_capacity(monkeypatch):
    capacity(monkeypatch, 64 * GIB)
    c = case(batch=8, seqlen=8192, q_len=8192)
    assert too_big(c, "sdpa_math", "cuda") == (
        "estimated out of memory: needs 65.2 GiB, device has 64.0 GiB")
    assert too_big(c, "dkbench", "cuda") is None
    capacity(monkeypatch, int(1.25 * GIB))  # exactly enough
    assert too_big(c, "dkbench", "cpu") is None
    capacity(monkeypatch, int(1.25 * GIB) - 1)
    assert too_big(c, "dkbench", "cpu").startswith("estimated out of memory: needs 1.25 GiB")
    capacity(monkeypatch, None)  # a device whose memory is unknown is never refused
    assert too_big(c, "sdpa_math", "mps") is None


def test_the_checks_reference_must_fit_too(monkeypatch):
    c = case(seqlen=4096, q_len=4096, heads=32, kv_heads=32)  # 128 MiB of bf16 tensors
    capacity(monkeypatch, 256 * 2**20)
    assert too_big(c, "dkbench", "cpu") is None
    # The check runs the reference on 2048 tokens: 64 MiB of tensors and a 512 MiB score matrix.
    assert estimate_case_bytes(replace(c, seqlen=2048, q_len=2048), REFERENCE) == 576 * 2**20
    assert too_big(c, "dkbench", "cpu", check_tokens=2048) == (
        "estimated out of memory: needs 0.56 GiB, device has 0.25 GiB")


def test_device_capacity(monkeypatch):
    assert device_capacity_bytes("cpu") == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert device_capacity_bytes(torch.device("cpu")) > 2**28
    calls = []

    def mem_get_info(device):
        calls.append(device)
        return 3 * GIB, 80 * GIB  # (free, total)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert device_capacity_bytes("cuda:1") == 80 * GIB
    assert calls == [torch.device("cuda", 1)]
    assert device_capacity_bytes("meta") is None


# -- interpreter time --

def test_interpreter_estimate_scales_from_three_seconds():
    base = case(dtype="float32", seqlen=1000, q_len=1000, heads=1, kv_heads=1, head_dim=64)
    assert interpreter_estimate_s([base], ["dkbench"]) == pytest.approx(3.0)
    assert interpreter_estimate_s([base], ["sdpa_math", "dkbench"]) == pytest.approx(3.0)
    assert interpreter_estimate_s([base], ["sdpa_math", "flex"]) == 0.0  # no Triton kernel
    big = replace(base, mode="fwd_bwd", seqlen=2048, q_len=2048, heads=32, head_dim=128)
    # 3 s x 2048^2 x 32 x 128 / (1000^2 x 64) x 3.5
    assert interpreter_estimate_s([big], ["dkbench"]) == pytest.approx(3 * 268.435456 * 3.5)
    assert interpreter_estimate_s([replace(base, batch=2)], ["dkbench"]) == pytest.approx(6.0)
    assert interpreter_estimate_s([replace(base, causal=False)], ["dkbench"]) == pytest.approx(6.0)
    assert interpreter_estimate_s([replace(base, mode="bwd")], ["dkbench"]) == pytest.approx(7.5)
    assert interpreter_estimate_s([base, base], ["dkbench"]) == pytest.approx(6.0)


def test_cpu_warning_past_three_minutes():
    base = case(dtype="float32", seqlen=1000, q_len=1000, heads=1, kv_heads=1, head_dim=64)
    assert cpu_warning([base] * 60, ["dkbench", "sdpa_math"]) is None  # 180 s: not past it
    text = cpu_warning([base] * 61, ["dkbench", "sdpa_math"])  # 183 s
    assert "about 3 min" in text and "sweeps/smoke.yaml" in text, text
    phi3 = load_spec(SWEEPS / "phi3.yaml")
    text = cpu_warning(expand(phi3), phi3.providers)
    assert text and " h (estimated)" in text and "sweeps/smoke.yaml" in text, text


# -- the CPU default sweep --

def test_smoke_is_quick_on_a_cpu_and_fits():
    smoke = load_spec(SWEEPS / "smoke.yaml")
    cases = expand(smoke)
    assert cpu_warning(cases, smoke.providers) is None
    assert all(too_big(c, p, "cpu", smoke.check.max_tokens) is None
               for c in cases for p in smoke.providers)


@needs_interpreter
def test_smoke_runs_clean_on_a_cpu(tmp_path):
    result = CliRunner().invoke(app, ["run", str(SWEEPS / "smoke.yaml"), "--device", "cpu",
                                      "--out", str(tmp_path), "--quiet"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "did not run ok" not in result.output, result.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    frame = read_results(run_dir)
    assert len(frame) >= 4 and set(frame["status"]) == {"ok"}, frame[["provider", "message"]]
