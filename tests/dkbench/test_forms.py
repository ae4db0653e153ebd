"""The pattern compiler: every backend form, expanded back to token pairs, is the layout's mask."""

from __future__ import annotations

import pytest
import torch

from dkbench.measure.providers.forms import (
    block_index,
    coarse_blocks,
    expand_blocks,
    per_kv_head,
    sparse_index,
)
from kernels import BlockLayout, local_stride_layout, random_layout, token_mask
from kernels.reference import layout_head_index

HEADS, KV_HEADS = 4, 2


def layouts() -> dict[str, BlockLayout]:
    """Random, local-stride (per head and per group) and a bidirectional layout, block 32."""
    return {
        "random": random_layout(HEADS, 12, 32, 0.4, seed=3),
        "local_stride": local_stride_layout(HEADS, 12 * 32, 32, 2, 3, head_sliding_offset=1),
        "per_group": local_stride_layout(HEADS, 12 * 32, 32, 2, 3, num_kv_heads=KV_HEADS),
        "bidirectional": random_layout(HEADS, 12, 32, 0.5, seed=5, causal=False),
    }


def per_query_head_mask(layout: BlockLayout, q_len: int, seq_k: int) -> torch.Tensor:
    mask = token_mask(layout, seq_k, q_len)
    return mask[layout_head_index(HEADS, KV_HEADS, layout.heads)]


# (q_len, seq_k): whole blocks, a ragged last block, queries shorter than keys (aligned to
# nothing), one query.
SHAPES = [(384, 384), (350, 350), (200, 381), (1, 300)]
BLOCKS = [(32, 32), (64, 64), (128, 64), (64, 128), (16, 48), (128, 128)]


@pytest.mark.parametrize("name", list(layouts()))
@pytest.mark.parametrize(("q_len", "seq_k"), SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_coarse_blocks_cover_exactly_the_kept_pairs(name: str, q_len: int, seq_k: int,
                                                    block: tuple[int, int]) -> None:
    layout = layouts()[name]
    blocks = coarse_blocks(layout, HEADS, KV_HEADS, q_len, seq_k, *block)
    want = per_query_head_mask(layout, q_len, seq_k)
    full = expand_blocks(blocks.full, *block, q_len, seq_k)
    kept = expand_blocks(blocks.kept, *block, q_len, seq_k)
    assert not bool((blocks.full & blocks.partial).any())
    # Full blocks need no mask: every pair in them is kept.
    assert bool(want[full].all())
    # Every kept pair lies in a full or a partial block.
    assert bool(kept[want].all())
    # A partial block holds at least one kept pair and at least one dropped pair (or padding).
    for h, i, j in blocks.partial.nonzero().tolist():
        tile = want[h, i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
        assert bool(tile.any())
        whole = tile.shape == block
        assert not (whole and bool(tile.all())), (h, i, j)


def test_a_full_block_must_lie_below_the_diagonal_and_inside_the_sequence() -> None:
    dense = BlockLayout.from_pattern(torch.ones(1, 4, 4, dtype=torch.bool), 64)
    blocks = coarse_blocks(dense, 1, 1, 250, 250, 64, 64)
    # Diagonal blocks are partial; the ragged last row and column are partial too.
    assert blocks.full[0].tolist() == [[False] * 4, [True, False, False, False],
                                       [True, True, False, False], [False, False, False, False]]
    assert blocks.partial[0].tolist() == [[True, False, False, False], [False, True, False, False],
                                          [False, False, True, False], [True, True, True, True]]


def test_block_index_lists_kept_columns_first_in_ascending_order() -> None:
    mask = torch.tensor([[[False, True, False, True], [True, True, True, True],
                          [False, False, False, False]]])
    counts, index = block_index(mask)
    assert counts.tolist() == [[2, 4, 0]]
    assert index[0, 0, :2].tolist() == [1, 3]
    assert index[0, 1].tolist() == [0, 1, 2, 3]
    assert index.dtype == counts.dtype == torch.int32


@pytest.mark.parametrize("kv_major", [True, False])
def test_sparse_index_round_trips_to_the_block_maps(kv_major: bool) -> None:
    layout = layouts()["random"]
    blocks = coarse_blocks(layout, HEADS, KV_HEADS, 350, 350, 64, 128)
    index = sparse_index(blocks, kv_major=kv_major)
    for count, idx, want in ((index.full_count, index.full_index, blocks.full),
                             (index.partial_count, index.partial_index, blocks.partial)):
        assert count.shape[0] == idx.shape[0] == 1  # broadcast over the batch
        rebuilt = torch.zeros_like(want if kv_major else want.transpose(1, 2))
        for h in range(rebuilt.shape[0]):
            for r in range(rebuilt.shape[1]):
                rebuilt[h, r, idx[0, h, r, :int(count[0, h, r])].long()] = True
        assert torch.equal(rebuilt, want if kv_major else want.transpose(1, 2))
    assert (index.block_q, index.block_kv) == (64, 128)


def test_per_kv_head_keeps_one_map_per_group() -> None:
    layout = layouts()["per_group"]
    blocks = coarse_blocks(layout, HEADS, KV_HEADS, 384, 384, 32, 32)
    maps = per_kv_head(blocks.kept, KV_HEADS)
    assert maps.shape == (KV_HEADS, *blocks.kept.shape[1:])
    for h in range(HEADS):
        assert torch.equal(maps[h // (HEADS // KV_HEADS)], blocks.kept[h])


def test_per_kv_head_refuses_heads_of_one_group_with_different_patterns() -> None:
    layout = layouts()["local_stride"]  # one pattern per query head
    blocks = coarse_blocks(layout, HEADS, KV_HEADS, 384, 384, 32, 32)
    with pytest.raises(ValueError, match="one pattern per group"):
        per_kv_head(blocks.kept, KV_HEADS)


def test_bad_block_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        coarse_blocks(layouts()["random"], HEADS, KV_HEADS, 384, 384, 0, 64)


@pytest.mark.parametrize("name", ["random", "local_stride", "bidirectional"])
@pytest.mark.parametrize(("q_len", "seq_k"), [(384, 384), (350, 350), (200, 381)])
@pytest.mark.parametrize("block", [(128, 128), (128, 64), (64, 128)])
def test_flex_block_mask_with_its_mask_mod_is_the_token_mask(name: str, q_len: int, seq_k: int,
                                                             block: tuple[int, int]) -> None:
    from torch.nn.attention.flex_attention import create_mask

    from dkbench.measure.providers.flex import build_block_mask

    layout = layouts()[name]
    mask = build_block_mask(layout, HEADS, KV_HEADS, q_len, seq_k, torch.device("cpu"), block)
    assert mask.BLOCK_SIZE == block
    per_token = create_mask(mask.mask_mod, 1, HEADS, q_len, seq_k, device="cpu")[0]
    dense = mask.to_dense()[0].bool()  # (heads, q_blocks, kv_blocks): full or partial
    listed = expand_blocks(dense, *block, q_len, seq_k)
    want = per_query_head_mask(layout, q_len, seq_k)
    assert torch.equal(per_token, want)  # the mask_mod alone is the pattern, token by token
    assert bool(listed[want].all())  # and no kept pair lies in a block the mask skips


def test_a_padded_table_holds_the_pattern_in_its_corner_and_zeros_around_it() -> None:
    from dkbench.measure.providers.forms import TABLE_SLACK_TOKENS, per_head_table

    layout = layouts()["random"]
    own = per_head_table(layout, HEADS, KV_HEADS, torch.device("cpu"))
    slack = TABLE_SLACK_TOKENS // layout.block_size
    assert own.shape == (HEADS, 12 + slack, 12 + slack)
    padded = per_head_table(layout, HEADS, KV_HEADS, torch.device("cpu"), at_least=(6, 40, 33))
    assert padded.shape == (6, 40, 33)
    assert torch.equal(padded[:HEADS, :own.shape[1], :own.shape[2]], own)
    assert int(padded.sum()) == int(own.sum()) > 0  # nothing kept outside the corner
    # A smaller at_least never cuts the table.
    assert per_head_table(layout, HEADS, KV_HEADS, torch.device("cpu"),
                          at_least=(1, 2, 3)).shape == own.shape


def test_every_case_of_the_phi3_sweep_shares_one_flex_table_shape() -> None:
    from pathlib import Path

    from dkbench.measure.providers import flex
    from dkbench.spec.load import load_spec

    sweep = load_spec(Path(__file__).parents[2] / "sweeps" / "phi3.yaml")
    # 65,536 tokens in blocks of 64, plus 256 tokens of slack; 32 query heads.
    assert flex.shared_table_shape(sweep, 64) == (32, 1024 + 4, 1024 + 4)
    assert flex.shared_table_shape(sweep, 128) == (0, 0, 0)  # no case at that block size
    small = sweep.model_copy(update={"seqlen": [128, 256]})
    assert flex.shared_table_shape(small, 64) == (32, 4 + 4, 4 + 4)


def test_a_shared_table_past_its_size_limit_leaves_each_case_its_own(monkeypatch) -> None:
    from pathlib import Path

    from dkbench.measure.providers import flex
    from dkbench.spec.load import load_spec

    sweep = load_spec(Path(__file__).parents[2] / "sweeps" / "phi3.yaml")
    monkeypatch.setattr(flex, "SHARED_TABLE_BYTES", 32 * 1028 * 1028 - 1)
    assert flex.shared_table_shape(sweep, 64) == (0, 0, 0)


@pytest.mark.parametrize("name", ["random", "local_stride", "bidirectional"])
@pytest.mark.parametrize(("q_len", "seq_k"), [(384, 384), (200, 381)])
def test_flex_mask_mod_on_a_padded_table_is_the_token_mask(name: str, q_len: int,
                                                            seq_k: int) -> None:
    from torch.nn.attention.flex_attention import create_mask

    from dkbench.measure.providers.flex import build_block_mask

    layout = layouts()[name]
    mask = build_block_mask(layout, HEADS, KV_HEADS, q_len, seq_k, torch.device("cpu"),
                            (128, 64), table_shape=(HEADS + 2, 37, 41))
    per_token = create_mask(mask.mask_mod, 1, HEADS, q_len, seq_k, device="cpu")[0]
    assert torch.equal(per_token, per_query_head_mask(layout, q_len, seq_k))
