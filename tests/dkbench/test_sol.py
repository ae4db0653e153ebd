"""The speed-of-light model (dkbench.measure.sol) against hand-computed bytes, and its two result columns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dkbench.measure import runner, sol
from dkbench.measure.calibrate import Calibration, unavailable_reason
from dkbench.measure.providers import PROVIDERS
from dkbench.results.schema import read_meta
from dkbench.spec.load import load_spec
from dkbench.spec.patterns import DensePattern
from dkbench.spec.sweep import Case, expand
from kernels import BlockLayout
from kernels.layout import dense_layout

from .specs import write_spec

CPU = torch.device("cpu")
NOTE = "faster than the speed of light: check the FLOP/byte model"


def calibration(bf16_tflops: float = 1000.0, copy_gbs: float = 4000.0) -> Calibration:
    return Calibration(gpu="Fake GPU", capability="9.0", torch="", triton="",
                       matmul_tflops={"bfloat16": bf16_tflops, "float16": bf16_tflops},
                       copy_gbs=copy_gbs, sm_clock_mhz=None, measured_at="")


def case(mode: str = "fwd", seqlen: int = 256, lengths: tuple[int, ...] | None = None,
         causal: bool = True) -> Case:
    """heads 4, kv_heads 2 (query heads 0, 1 share kv head 0; 2, 3 kv head 1), head_dim 64, bf16."""
    batch = len(lengths) if lengths else 1
    q_len = 1 if mode == "decode" else seqlen
    return Case(mode=mode, dtype="bfloat16", batch=batch, seqlen=seqlen, q_len=q_len, heads=4,
                kv_heads=2, head_dim=64, causal=causal, pattern=DensePattern(type="dense"),
                sm_scale=None, seed=0, lengths=lengths)


def dense(seqlen: int = 256, causal: bool = True) -> BlockLayout:
    return dense_layout(-(-seqlen // 64), 64, causal)


def per_head(*rows_per_head: dict[int, list[int]], causal: bool, blocks: int = 4) -> BlockLayout:
    """A 4-head pattern: for each head, {q_block: kept kv blocks}; unnamed rows keep their
    diagonal (causal) or block 0 (bidirectional)."""
    pattern = torch.zeros(len(rows_per_head), blocks, blocks, dtype=torch.bool)
    for h, rows in enumerate(rows_per_head):
        for i in range(blocks):
            for j in rows.get(i, [i] if causal else [0]):
                pattern[h, i, j] = True
    return BlockLayout.from_pattern(pattern, 64, causal=causal, warn_kv_cache=False)


# Bidirectional, every query block of a head keeping the same kv blocks: head 0 keeps block 0,
# head 1 block 1 (group 0's union: blocks 0 and 1), heads 2 and 3 block 0 (group 1: block 0).
SPARSE = per_head(*({i: [b] for i in range(4)} for b in (0, 1, 0, 0)), causal=False)
# Causal, for decode at lengths 100 (query in block 1, 2 blocks: 64 + 36 keys) and 200 (query in
# block 3, 4 blocks: 64 + 64 + 64 + 8 keys).
DECODE = per_head({1: [1], 3: [0, 3]}, {1: [0, 1], 3: [2, 3]}, {1: [1], 3: [3]},
                  {1: [1], 3: [3]}, causal=True)


# -- bytes, by hand --

def test_dense_fwd_bytes() -> None:
    # q and o: 256 tokens * 4 heads * 64 * 2 B = 131072 each; k and v: 256 * 2 kv heads * 64 * 2 B
    # = 65536 each; 2 * 131072 + 2 * 65536 = 393216.
    assert sol.row_bytes(case(), dense(), "dense") == 393216
    # A sparse provider on the dense layout reads the same.
    assert sol.row_bytes(case(), dense(), "pattern") == 393216


def test_sparse_fwd_reads_the_union_of_each_gqa_group() -> None:
    # Group 0 reads blocks {0} | {1}: 128 keys, more than either head's 64; group 1 reads {0}: 64.
    # k and v: 192 keys * 64 * 2 B = 24576 each; q and o 131072 each: 311296 in all.
    assert sol.kept_kv_tokens(case(causal=False), SPARSE, 256, 256) == 192
    assert sol.row_bytes(case(causal=False), SPARSE, "pattern") == 311296
    # A dense provider on the same case reads every key: 393216 as above.
    assert sol.row_bytes(case(causal=False), SPARSE, "dense") == 393216


def test_sparse_union_counts_only_the_query_blocks_present() -> None:
    # q_len 64 of 256 (causal): only query block 3 is there. Head 0's row 3 keeps {0, 3}, head 1's
    # {2, 3} -> group 0 reads {0, 2, 3}: 192 keys; heads 2, 3 keep {3} -> group 1: 64 keys.
    # The earlier rows (block 1's {0, 1} of head 1) are not read.
    layout = per_head({1: [0, 1], 3: [0, 3]}, {3: [2, 3]}, {}, {}, causal=True)
    assert sol.kept_kv_tokens(case(), layout, 256, 64) == 192 + 64
    c = Case(**{**case().__dict__, "q_len": 64})
    # q and o: 64 * 4 * 64 * 2 B = 32768 each; k and v: 256 keys * 64 * 2 B = 32768 each.
    assert sol.row_bytes(c, layout, "pattern") == 4 * 32768


def test_decode_bytes_dense_and_sparse() -> None:
    c = case("decode", seqlen=200, lengths=(100, 200))
    # q and o: 2 sequences * 4 heads * 64 * 2 B = 1024 each.
    # Dense: the caches of 100 + 200 tokens, 2 kv heads, k and v: 300 * 2 * 2 * 64 * 2 = 153600.
    assert sol.row_bytes(c, dense(200), "dense") == 2048 + 153600
    # Padded dense (reads the whole 200-token cache of both): 400 * 2 * 2 * 64 * 2 = 204800.
    assert sol.row_bytes(c, dense(200), "dense", padded=True) == 2048 + 204800
    # Sparse, the row of the query's block: length 100, group 0 {1} | {0, 1} = 64 + 36, group 1
    # {1} = 36; length 200, group 0 {0, 3} | {2, 3} = 64 + 64 + 8, group 1 {3} = 8. 280 keys:
    # 280 * 2 (k, v) * 64 * 2 B = 71680. Padding never applies to a sparse provider.
    assert sol.row_bytes(c, DECODE, "pattern") == 2048 + 71680
    assert sol.row_bytes(c, DECODE, "pattern", padded=True) == 2048 + 71680


def test_prefill_varlen_counts_each_sequence_on_its_own_length() -> None:
    c = case("prefill_varlen", seqlen=200, lengths=(100, 200))
    # Per token: q, o 4 heads each, k, v 2 kv heads each: 12 * 64 * 2 B = 1536; 300 tokens.
    assert sol.row_bytes(c, dense(200), "dense") == 300 * 1536
    assert sol.row_bytes(c, dense(200), "dense", padded=True) == 400 * 1536


@pytest.mark.parametrize("mode", ["bwd", "fwd_bwd"])
def test_backward_bytes(mode: str) -> None:
    # The forward's 393216, then dO read and dq written (131072 each) and dk, dv written in full
    # (65536 each): 393216 more. The backward's rereads of q, k, v, o are not counted again.
    assert sol.row_bytes(case(mode), dense(), "dense") == 786432
    # Sparse: k, v read 24576 each (the union above), dk, dv still written in full.
    assert sol.row_bytes(case(mode, causal=False), SPARSE, "pattern") == (
        4 * 131072 + 2 * 24576 + 2 * 65536)


# -- the speed of light --

def test_sol_ms_takes_the_larger_term() -> None:
    cal = calibration(bf16_tflops=1000.0, copy_gbs=4000.0)
    # Compute-bound: 1e12 FLOP at 1000 TFLOP/s is 1 ms; 1e6 B at 4000 GB/s 0.00025 ms.
    assert sol.sol_ms(1e12, 1e6, cal, "bfloat16") == pytest.approx(1.0)
    # Memory-bound: 4e9 B is 1 ms; 1e9 FLOP 0.001 ms.
    assert sol.sol_ms(1e9, 4e9, cal, "bfloat16") == pytest.approx(1.0)
    # float32 has no calibrated tensor-core rate: the bytes alone (4e6 B: 0.001 ms).
    assert sol.sol_ms(1e12, 4e6, cal, "float32") == pytest.approx(1e-3)


# -- the columns in a run --

def run(tmp_path: Path, **overrides):
    path = write_spec(tmp_path, **overrides)
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    rows = runner.execute(sweep, path.read_text(), plan, CPU)
    return sweep, rows, read_meta(plan.run_dir)


def test_cpu_run_leaves_the_columns_nan_and_says_why(tmp_path: Path) -> None:
    _, rows, meta = run(tmp_path)
    assert [r.status for r in rows] == ["ok"]
    assert math.isnan(rows[0].sol_ms) and math.isnan(rows[0].sol_pct)
    reason = unavailable_reason(CPU)
    assert reason and meta["speed_of_light"] == {"unavailable": reason}


@pytest.mark.parametrize(("rate", "faster"), [(1e6, False), (1e-9, True)])
def test_a_calibrated_run_fills_the_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            rate: float, faster: bool) -> None:
    # A huge rate puts the speed of light far below the measured time; a tiny one far above it.
    cal = calibration(bf16_tflops=rate, copy_gbs=rate)
    monkeypatch.setattr(runner, "load_or_calibrate", lambda device: cal)
    sweep, (row,), meta = run(tmp_path, dtype="bf16")
    assert meta["speed_of_light"] == cal.as_dict()
    (c,) = expand(sweep)
    layout = c.pattern.layout(c.heads, c.kv_heads, c.seqlen, c.causal)
    provider = PROVIDERS[row.provider]
    nbytes = sol.row_bytes(c, layout, provider.computes, provider.pads_inputs)
    want = max(row.flops / (rate * 1e12), nbytes / (rate * 1e9)) * 1e3
    assert row.sol_ms == pytest.approx(want)
    assert row.sol_pct == pytest.approx(100 * want / row.ms)
    assert row.status == "ok"  # left as measured either way
    assert (row.sol_pct > 100) == faster and (NOTE in row.message) == faster


def test_a_failed_calibration_only_leaves_the_columns_empty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(device: torch.device) -> Calibration:
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(runner, "load_or_calibrate", broken)
    _, (row,), meta = run(tmp_path)
    assert row.status == "ok" and math.isnan(row.sol_ms)
    assert meta["speed_of_light"] == {
        "unavailable": "calibrating failed: RuntimeError: CUDA error: out of memory"}
