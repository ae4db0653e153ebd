"""The FlashInfer adapters without FlashInfer: availability, the decode page table, and the
block-sparse plan, expanded the way FlashInfer's kernel reads it, against the layout's mask."""

from __future__ import annotations

import sys

import pytest
import torch

from dkbench.measure.providers import flashinfer as fi
from dkbench.measure.providers.base import Unsupported
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand
from kernels import BlockLayout, local_stride_layout, random_layout, token_mask
from kernels.reference import layout_head_index

from .specs import write_spec

HEADS, KV_HEADS = 4, 2
CPU = torch.device("cpu")


def flashinfer_mask(blocks: fi.VariableBlocks, causal: bool) -> torch.Tensor:
    """The token pairs ``(kv_heads, q_len, seq_k)`` FlashInfer attends for this plan: each
    (kv head, q block) row gathers its kept kv blocks in ascending order; its causal mask drops
    gathered key t for row query r when ``t + qo_len > kv_len + r`` (prefill.cuh)."""
    rows, cols = blocks.row_sizes.tolist(), blocks.col_sizes.tolist()
    q_start = torch.tensor([0, *rows]).cumsum(0).tolist()
    k_start = torch.tensor([0, *cols]).cumsum(0).tolist()
    out = torch.zeros(blocks.mask.shape[0], q_start[-1], k_start[-1], dtype=torch.bool)
    for g in range(blocks.mask.shape[0]):
        for i, qo_len in enumerate(rows):
            keys = torch.cat([torch.arange(k_start[j], k_start[j + 1])
                              for j in blocks.mask[g, i].nonzero().flatten().tolist()])
            kv_len = keys.numel()
            for r in range(qo_len):
                seen = keys if not causal else keys[:max(0, kv_len - qo_len + r + 1)]
                out[g, q_start[i] + r, seen] = True
    return out


def layouts() -> dict[str, BlockLayout]:
    return {
        "per_group": local_stride_layout(HEADS, 12 * 32, 32, 2, 3, num_kv_heads=KV_HEADS),
        "per_group_bidir": local_stride_layout(HEADS, 12 * 32, 32, 1, 3, num_kv_heads=KV_HEADS,
                                               causal=False),
        "shared_random": random_layout(1, 12, 32, 0.4, seed=3),
    }


# (q_len, seq_k): ragged last block; queries shorter than keys, at an offset aligned to nothing;
# one query.
SHAPES = [(350, 350), (200, 381), (1, 300)]
# The pattern's block, finer square blocks, and kv blocks that divide the q block.
BLOCKS = [(32, 32), (16, 16), (32, 16)]


@pytest.mark.parametrize("name", list(layouts()))
@pytest.mark.parametrize(("q_len", "seq_k"), SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_the_plan_attends_exactly_the_layouts_token_mask(name: str, q_len: int, seq_k: int,
                                                         block: tuple[int, int]) -> None:
    layout = layouts()[name]
    blocks = fi.variable_blocks(layout, HEADS, KV_HEADS, q_len, seq_k, *block)
    assert int(blocks.row_sizes.sum()) == q_len and int(blocks.col_sizes.sum()) == seq_k
    assert blocks.mask.shape == (KV_HEADS, blocks.row_sizes.numel(), blocks.col_sizes.numel())
    got = flashinfer_mask(blocks, layout.causal)
    want = token_mask(layout, seq_k, q_len)[layout_head_index(HEADS, KV_HEADS, layout.heads)]
    group = HEADS // KV_HEADS
    for h in range(HEADS):
        assert torch.equal(got[h // group], want[h]), (name, h)


def test_variable_blocks_by_hand() -> None:
    # Three 16-token pattern blocks, causal, block (1, 0) dropped; 40 keys, the last 30 queried.
    pattern = torch.tensor([[[1, 0, 0], [0, 1, 0], [1, 1, 1]]], dtype=torch.bool)
    layout = BlockLayout.from_pattern(pattern, 16, warn_kv_cache=False)
    blocks = fi.variable_blocks(layout, 2, 1, 30, 40, 16, 16)
    # Queries 10..39: the first q block is cut at query 10, the last one and the last kv block
    # at the 40th key.
    assert blocks.row_sizes.tolist() == [6, 16, 8]
    assert blocks.col_sizes.tolist() == [16, 16, 8]
    assert blocks.mask.tolist() == [[[True, False, False], [False, True, False],
                                     [True, True, True]]]
    assert blocks.row_sizes.dtype == blocks.col_sizes.dtype == torch.int32


def test_batch_folds_into_the_kv_heads() -> None:
    layout = layouts()["per_group"]
    blocks = fi.variable_blocks(layout, HEADS, KV_HEADS, 350, 350, 32, 32)
    mask, rows, cols = fi.batched_plan_args(blocks, 3)
    assert mask.shape == (3 * KV_HEADS, *blocks.mask.shape[1:])
    for b in range(3):
        for g in range(KV_HEADS):
            assert torch.equal(mask[b * KV_HEADS + g], blocks.mask[g])
    assert rows.shape == (3 * KV_HEADS, blocks.row_sizes.numel())
    assert bool((rows.sum(1) == 350).all()) and bool((cols.sum(1) == 350).all())


def test_one_pattern_per_query_head_is_refused_under_gqa() -> None:
    layout = local_stride_layout(HEADS, 12 * 32, 32, 2, 3, head_sliding_offset=1)
    with pytest.raises(Unsupported, match="one pattern per GQA group"):
        fi.variable_blocks(layout, HEADS, KV_HEADS, 384, 384, 32, 32)
    # Without GQA every query head has its own kv head, so its own map.
    blocks = fi.variable_blocks(layout, HEADS, HEADS, 384, 384, 32, 32)
    assert torch.equal(blocks.mask, layout.pattern)


@pytest.mark.parametrize(("block", "causal", "match"), [
    ((64, 64), True, "must divide the pattern's 32-token block"),
    ((32, 64), False, "must divide the pattern's 32-token block"),
    ((16, 32), True, "kv block .32. must divide the q block .16."),
])
def test_block_shapes_flashinfer_cannot_mask_are_refused(block, causal, match) -> None:
    layout = local_stride_layout(HEADS, 12 * 32, 32, 2, 3, num_kv_heads=KV_HEADS, causal=causal)
    with pytest.raises(Unsupported, match=match):
        fi.variable_blocks(layout, HEADS, KV_HEADS, 384, 384, *block)


def test_bidirectional_blocks_need_not_nest() -> None:
    layout = layouts()["per_group_bidir"]
    blocks = fi.variable_blocks(layout, HEADS, KV_HEADS, 350, 350, 16, 32)
    assert torch.equal(flashinfer_mask(blocks, False)[0], token_mask(layout, 350)[0])


def test_page_table_by_hand() -> None:
    indptr, indices, last = fi.page_table(torch.tensor([5, 16, 17, 1], dtype=torch.int32), 32, 8)
    # Four pages per sequence: sequence b owns pages 4b..4b+3 and uses ceil(len / 8) of them.
    assert indptr.tolist() == [0, 1, 3, 6, 7]
    assert indices.tolist() == [0, 4, 5, 8, 9, 10, 12]
    assert last.tolist() == [5, 8, 1, 1]
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32


def test_page_table_reads_each_sequences_tokens_from_the_paged_view() -> None:
    lengths, max_len, page = [7, 24, 13], 24, 4
    cache = torch.arange(3 * max_len).view(3, max_len, 1, 1)
    pages = cache.view(-1, page, 1, 1)
    indptr, indices, last = fi.page_table(torch.tensor(lengths), max_len, page)
    for b, n in enumerate(lengths):
        own = indices[indptr[b]:indptr[b + 1]].long()
        tokens = pages[own].flatten()[:(len(own) - 1) * page + int(last[b])]
        assert torch.equal(tokens, cache[b, :n].flatten())


def test_decode_page_size() -> None:
    assert fi.decode_page_size(4096) == 16
    assert fi.decode_page_size(40) == 8
    assert fi.decode_page_size(33) == 1
    assert fi.decode_page_size(96, 32) == 32
    with pytest.raises(Unsupported, match="does not divide"):
        fi.decode_page_size(100, 16)


def test_providers_declare_their_problems() -> None:
    assert (fi.FlashInferSparse.name, fi.FlashInferSparse.computes) == ("flashinfer", "pattern")
    assert fi.FlashInferSparse.modes == ("fwd",)
    assert (fi.FlashInferDecode.name, fi.FlashInferDecode.computes) == ("flashinfer_decode",
                                                                        "dense")
    assert fi.FlashInferDecode.modes == ("decode",)
    assert not fi.FlashInferSparse.supports_grad and not fi.FlashInferDecode.supports_grad
    refused = fi.FlashInferSparse().refused(ValueError("bad head_dim"))
    assert refused == "flashinfer refused this case: ValueError: bad head_dim"
    assert fi.FlashInferSparse().refused(RuntimeError("CUDA error")) is None


@pytest.mark.parametrize("cls", [fi.FlashInferSparse, fi.FlashInferDecode])
def test_unavailable_without_cuda_or_without_flashinfer(cls, monkeypatch) -> None:
    assert "CUDA GPU" in cls().unavailable(CPU)
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # `import flashinfer` fails
    fi.flashinfer_unavailable.cache_clear()
    try:
        reason = cls().unavailable(torch.device("cuda"))
    finally:
        fi.flashinfer_unavailable.cache_clear()
    # The import's own words, then the install hint.
    assert reason.startswith("flashinfer is not usable here (ModuleNotFoundError: import of "
                             "flashinfer halted")
    assert reason.endswith('pip install -e ".[flashinfer]"')


def test_prepare_refuses_a_per_head_pattern_before_importing_flashinfer(tmp_path) -> None:
    pattern = {"type": "local_stride", "block_size": 16, "local_blocks": 1, "vert_stride": 2,
               "head_sliding_offset": 1}
    sweep = load_spec(write_spec(tmp_path, heads=4, kv_heads=2, seqlen=64, patterns=[pattern]))
    (case,) = expand(sweep)
    layout = case.pattern.layout(4, 2, 64, True)
    with pytest.raises(Unsupported, match="one pattern per GQA group"):
        fi.FlashInferSparse().prepare(case, layout, sweep, CPU, 0.25)
