"""The FLOP model against hand counts, and `kept_pairs` against the token mask it stands for."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dkbench.measure import metrics
from dkbench.spec.patterns import DensePattern, LocalStridePattern
from dkbench.spec.sweep import Case
from kernels import (
    BlockLayout,
    dense_layout,
    local_stride_layout,
    random_layout,
    token_mask,
)
from kernels.layout import causal_pairs, kept_pairs

from .specs import needs_interpreter, write_spec

# Two 16-token blocks, 2 query heads sharing 1 kv head, local_blocks=1, vert_stride=2 (step 1):
# head 0 keeps blocks (0,0), (1,0), (1,1); head 1 keeps the diagonal only.
# Kept pairs: head 0 = 136 + 256 + 136 = 528, head 1 = 136 + 136 = 272, mean 400.
# All causal pairs of 32 tokens: 32 * 33 / 2 = 528.
TINY_PATTERN = LocalStridePattern(type="local_stride", block_size=16, local_blocks=1, vert_stride=2)
TINY_KEPT, TINY_CAUSAL = 400.0, 528.0


def make_case(mode: str = "fwd", batch: int = 1, heads: int = 2, head_dim: int = 16,
              seqlen: int = 32, q_len: int | None = None, causal: bool = True,
              pattern=TINY_PATTERN) -> Case:
    return Case(mode=mode, dtype="float32", batch=batch, seqlen=seqlen,
                q_len=seqlen if q_len is None else q_len, heads=heads, kv_heads=1,
                head_dim=head_dim, causal=causal, pattern=pattern, sm_scale=None, seed=0)


def blocks(bits: list[list[int]]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


# -- pair counts --

def test_causal_pairs_by_hand() -> None:
    assert causal_pairs(4, 4) == 1 + 2 + 3 + 4
    assert causal_pairs(2, 4) == 3 + 4  # queries are the last positions: 2 and 3
    assert causal_pairs(1, 5) == 5


def test_dense_pairs() -> None:
    assert metrics.dense_pairs(make_case()) == TINY_CAUSAL
    assert metrics.dense_pairs(make_case(causal=False)) == 32 * 32
    assert metrics.dense_pairs(make_case(seqlen=48, q_len=8)) == sum(range(41, 49))


def test_pattern_pairs_by_hand() -> None:
    case = make_case()
    layout = TINY_PATTERN.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    assert metrics.pattern_pairs(case, layout) == TINY_KEPT


# Three 16-token blocks, diagonal plus (2, 0).
THREE = [[1, 0, 0], [0, 1, 0], [1, 0, 1]]


@pytest.mark.parametrize(("seq_k", "seq_q", "want"), [
    (48, 48, 3 * 136 + 256),  # three full diagonal triangles and one full block
    (40, 40, 2 * 136 + 8 * 9 // 2 + 8 * 16),  # ragged last block of 8 tokens
    (48, 8, sum(range(9, 17)) + 8 * 16),  # queries 40..47: keys 32..p, plus block 0
])
def test_kept_pairs_by_hand(seq_k: int, seq_q: int, want: int) -> None:
    layout = BlockLayout.from_pattern(blocks(THREE), 16, causal=True, warn_kv_cache=False)
    assert kept_pairs(layout, seq_k, seq_q) == want


def test_kept_pairs_is_the_mean_over_pattern_heads() -> None:
    pattern = torch.stack([blocks(THREE), blocks([[1, 0, 0], [0, 1, 0], [0, 0, 1]])])
    layout = BlockLayout.from_pattern(pattern, 16, causal=True, warn_kv_cache=False)
    assert kept_pairs(layout, 48) == (3 * 136 + 256 + 3 * 136) / 2


LAYOUTS = {
    "local_stride per head": lambda: local_stride_layout(4, 160, 16, 2, 3),
    "local_stride homo": lambda: local_stride_layout(4, 160, 16, 2, 3, homo_head=True),
    "local_stride bidirectional": lambda: local_stride_layout(4, 160, 16, 2, 3, causal=False),
    "local_stride dense heads": lambda: local_stride_layout(4, 160, 32, 1, 4, num_dense_heads=1),
    "random": lambda: random_layout(3, 10, 16, 0.4, seed=3),
    "random bidirectional": lambda: random_layout(3, 10, 16, 0.4, seed=3, causal=False),
    "dense": lambda: dense_layout(10, 16),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize(("seq_k", "seq_q"), [(160, 160), (150, 150), (150, 37), (129, 1)])
def test_kept_pairs_matches_token_mask(name: str, seq_k: int, seq_q: int) -> None:
    layout = LAYOUTS[name]()
    mask = token_mask(layout, seq_k, seq_q)
    assert mask.shape == (layout.heads, seq_q, seq_k)
    want = mask.sum(dim=(1, 2)).double().mean().item()
    assert kept_pairs(layout, seq_k, seq_q) == pytest.approx(want, rel=1e-12, abs=0)
    total = causal_pairs(seq_q, seq_k) if layout.causal else seq_q * seq_k
    assert layout.density(seq_k, seq_q) == pytest.approx(want / total, rel=1e-12)


def test_dense_layout_keeps_every_causal_pair() -> None:
    assert kept_pairs(dense_layout(10, 16), 150, 37) == causal_pairs(37, 150)
    assert kept_pairs(dense_layout(10, 16, causal=False), 150, 37) == 150 * 37


# -- FLOPs --

def test_flops_forward_by_hand() -> None:
    case = make_case(batch=3, heads=2, head_dim=16)
    # 4 * head_dim per (query, key) pair: 2 * head_dim for q.k, 2 * head_dim for p.v.
    assert metrics.flops(case, TINY_KEPT) == 4 * 16 * 400 * 3 * 2


@pytest.mark.parametrize(("mode", "factor"), [("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5)])
def test_flops_mode_factor(mode: str, factor: float) -> None:
    fwd = metrics.flops(make_case(), TINY_CAUSAL)
    got = metrics.flops(make_case(mode=mode), TINY_CAUSAL)
    assert got == pytest.approx(factor * fwd, rel=1e-15)


def test_tflops() -> None:
    assert metrics.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert metrics.tflops(5e9, 2.0) == pytest.approx(2.5)


@pytest.mark.parametrize(("gpu", "dtype", "want"), [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5),
    ("NVIDIA H100 80GB HBM3", "float32", 989.5 / 2),
    ("NVIDIA A100-SXM4-80GB", "float16", 312.0),
    ("NVIDIA L40S", "bfloat16", 362.0),
    ("cpu (triton interpreter)", "float32", None),
])
def test_peak_tflops(gpu: str, dtype: str, want: float | None) -> None:
    assert metrics.peak_tflops(gpu, dtype) == want


@needs_interpreter
def test_rows_credit_sparse_and_dense_providers(tmp_path: Path) -> None:
    """Through a run: the bundled kernel is credited with kept pairs, sdpa_math with all."""
    from dkbench.measure import runner
    from dkbench.spec.load import load_spec
    from dkbench.spec.sweep import expand

    path = write_spec(tmp_path, providers=["sdpa_math", "dkbench"], baseline="sdpa_math")
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    rows = {r.provider: r for r in runner.execute(sweep, path.read_text(), plan,
                                                  torch.device("cpu"))}
    assert {p: r.status for p, r in rows.items()} == {"sdpa_math": "ok", "dkbench": "ok"}
    dense_flops = 4 * 16 * TINY_CAUSAL * 1 * 2
    assert rows["sdpa_math"].flops == dense_flops
    assert rows["dkbench"].flops == 4 * 16 * TINY_KEPT * 1 * 2
    assert rows["dkbench"].density == pytest.approx(TINY_KEPT / TINY_CAUSAL)
    for row in rows.values():
        assert row.tflops == pytest.approx(row.flops / (row.ms * 1e-3) / 1e12)
        assert row.dense_tflops == pytest.approx(dense_flops / (row.ms * 1e-3) / 1e12)
    assert math.isnan(rows["sdpa_math"].sparsity_efficiency)
    assert rows["dkbench"].sparsity_efficiency == pytest.approx(
        rows["dkbench"].speedup * TINY_KEPT / TINY_CAUSAL)


def test_dense_pattern_counts_like_a_dense_provider() -> None:
    case = make_case(seqlen=40, q_len=24, pattern=DensePattern(type="dense", block_size=16))
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    assert metrics.pattern_pairs(case, layout) == metrics.dense_pairs(case) == causal_pairs(24, 40)
