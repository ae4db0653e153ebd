"""The prefill_varlen and decode modes end to end on the CPU: inputs, checks, FLOPs, statuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dkbench.errors import SpecError
from dkbench.measure import metrics, runner
from dkbench.measure.modes import make_inputs, sequence_lengths, unpad
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand
from kernels.layout import causal_pairs, kept_pairs

from .specs import needs_interpreter, write_spec

CPU = torch.device("cpu")
INFER = dict(seqlen=64, batch=3, length_spread=0.5, heads=4, kv_heads=2,
             patterns=[{"type": "local_stride", "block_size": 16, "local_blocks": 1,
                        "vert_stride": 2, "head_sliding_offset": 1}])


def _run(tmp_path: Path, **overrides):
    path = write_spec(tmp_path, **{**INFER, **overrides})
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    return runner.execute(sweep, path.read_text(), plan, CPU)


def test_lengths_are_ragged_reproducible_and_bounded(tmp_path):
    (case,) = expand(load_spec(write_spec(tmp_path, **INFER, mode="decode")))
    lengths = sequence_lengths(case)
    assert lengths == sequence_lengths(case) and len(lengths) == 3
    assert lengths[0] == 64 and all(32 <= n <= 64 for n in lengths)
    assert case.q_len == 1


def test_varlen_inputs_pad_and_unpad_round_trip(tmp_path):
    (case,) = expand(load_spec(write_spec(tmp_path, **INFER, mode="prefill_varlen")))
    inputs = make_inputs(case, CPU, seed=3)
    assert inputs.q.shape == (sum(inputs.lengths), 4, 16)
    assert inputs.q_pad.shape == (3, 4, 64, 16)
    torch.testing.assert_close(unpad(inputs.q_pad, inputs.lengths), inputs.q, rtol=0, atol=0)
    assert inputs.cu_seqlens.tolist()[-1] == sum(inputs.lengths)


def test_inference_pairs_follow_each_sequence(tmp_path):
    sweep = load_spec(write_spec(tmp_path, **INFER, mode=["prefill_varlen", "decode"]))
    varlen, decode = expand(sweep)
    layout = varlen.pattern.layout(4, 2, 64, True)
    lv, ld = sequence_lengths(varlen), sequence_lengths(decode)
    assert metrics.dense_pairs(varlen) == sum(causal_pairs(n, n) for n in lv) / 3
    assert metrics.pattern_pairs(varlen, layout) == pytest.approx(
        sum(kept_pairs(layout, n, n) for n in lv) / 3)
    assert metrics.dense_pairs(decode) == sum(ld) / 3
    assert metrics.padded_dense_pairs(decode) == 64.0  # a masked dense kernel reads the cache
    assert metrics.pattern_pairs(decode, layout) < metrics.dense_pairs(decode)


@needs_interpreter
@pytest.mark.parametrize("mode", ["prefill_varlen", "decode"])
def test_inference_modes_run_checked_rows(tmp_path, mode):
    rows = _run(tmp_path, mode=mode, providers=["sdpa_math", "dkbench", "flex"],
                baseline="sdpa_math")
    by = {r.provider: r for r in rows}
    for name in ("sdpa_math", "dkbench"):
        assert by[name].status == "ok", by[name].message
        assert by[name].rel_err < 1e-6 and by[name].flops > 0 and by[name].speedup > 0
    assert by["dkbench"].flops < by["sdpa_math"].flops  # sparse pairs vs padded dense pairs
    assert by["flex"].status == "unsupported"
    assert by["dkbench"].config.startswith("splits" if mode == "decode" else "m")


def test_decode_needs_causal_and_inference_modes_take_no_q_len(tmp_path):
    with pytest.raises(SpecError, match="decode needs causal: true"):
        load_spec(write_spec(tmp_path, **INFER, mode="decode", causal=False))
    with pytest.raises(SpecError, match="q_len applies to fwd/bwd/fwd_bwd"):
        load_spec(write_spec(tmp_path, **INFER, mode="decode", q_len=16))


def test_explicit_lengths_set_the_batch(tmp_path):
    spec = {**INFER, "batch": None, "length_spread": None, "lengths": [64, 17, 40]}
    (case,) = expand(load_spec(write_spec(tmp_path, **spec, mode="decode")))
    assert case.batch == 3 and sequence_lengths(case) == (64, 17, 40)
    with pytest.raises(SpecError, match="exceeds seqlen=64"):
        load_spec(write_spec(tmp_path, **{**spec, "lengths": [65]}, mode="decode"))
    with pytest.raises(SpecError, match="prefill_varlen and decode modes only"):
        load_spec(write_spec(tmp_path, **spec, mode="fwd"))
    with pytest.raises(SpecError, match="leave out batch"):
        load_spec(write_spec(tmp_path, **{**spec, "batch": 2}, mode="decode"))
