"""Paged KV-cache decoding: the same answer as the contiguous cache and the reference, whatever
the page size against the sparse block, with pages in random order; bad block tables refused
by name; a workspace makes a step allocate nothing."""

import math

import pytest
import torch

import kernels.buffers
import kernels.decode
from kernels import LaunchConfig, decode_workspace, reference_attention, sparse_attention_decode
from tests.kernels.cases import make_layout
from tests.tolerances import assert_verbose_close, rel_tol


def paginate(lengths: list[int], page_size: int, *caches: torch.Tensor, spare: int = 3,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Contiguous ``(batch, max_len, kv_heads, dim)`` caches as pages in random order (never the
    identity): the int32 block table ``(batch, max_pages)``, then each cache's pages
    ``(num_pages, page_size, kv_heads, dim)``, all through the one table.

    Only each sequence's first ``ceil(len / page_size)`` pages are real; everything else, the
    rows of a last page past the length and ``spare`` unused pages, is NaN, and the table's
    entries past a sequence's pages are -1, so a kernel that reads what it must not fails."""
    batch, max_len = caches[0].shape[:2]
    used = [math.ceil(n / page_size) for n in lengths]
    order = torch.randperm(sum(used) + spare, generator=generator)
    if torch.equal(order, torch.arange(order.numel())):
        order = order.roll(1)
    table = torch.full((batch, math.ceil(max_len / page_size)), -1, dtype=torch.int32)
    starts = [sum(used[:b]) for b in range(batch)]
    for b, (start, count) in enumerate(zip(starts, used)):
        table[b, :count] = order[start:start + count].to(torch.int32)
    paged = []
    for cache in caches:
        pages = torch.full((order.numel(), page_size, *cache.shape[2:]), float("nan"),
                           dtype=cache.dtype, device=cache.device)
        for b, (n, count) in enumerate(zip(lengths, used)):
            rows = torch.full((count * page_size, *cache.shape[2:]), float("nan"),
                              dtype=cache.dtype, device=cache.device)
            rows[:n] = cache[b, :n]
            pages[table[b, :count].long().to(cache.device)] = rows.view(count, page_size,
                                                                         *cache.shape[2:])
        paged.append(pages)
    return (table.to(caches[0].device), *paged)


def gather_pages(pages: torch.Tensor, table: torch.Tensor, max_len: int) -> torch.Tensor:
    """The pages of each sequence back in order: ``(batch, max_len, kv_heads, dim)``."""
    return pages[table.clamp(min=0).long()].flatten(1, 2)[:, :max_len]


def _problem(heads, kv_heads, dtype, device, lengths, max_len=200, dim=32):
    q = torch.randn(len(lengths), heads, dim, device=device, dtype=dtype)
    k = torch.randn(len(lengths), max_len, kv_heads, dim, device=device, dtype=dtype)
    return q, k, torch.randn_like(k)


# page size, sparse block, heads, kv heads, dtype, splits, config (None: the default, block_n =
# min(block, 64)): pages smaller than, equal to and larger than the sparse block and the step.
PAGED = [
    (16, 32, 4, 2, torch.float32, None, None),
    (32, 32, 2, 2, torch.bfloat16, 3, None),
    (64, 32, 4, 1, torch.float32, 2, LaunchConfig(16, 16, 4, 1)),
    (16, 64, 2, 2, torch.bfloat16, 1, None),
    (64, 64, 8, 2, torch.float32, 4, None),
    (32, 64, 4, 4, torch.float32, None, LaunchConfig(16, 32, 4, 1)),
]


@pytest.mark.parametrize("case", PAGED, ids=lambda c: f"page{c[0]}-block{c[1]}-h{c[2]}/{c[3]}-"
                         f"{str(c[4])[6:]}-splits{c[5]}")
def test_paged_equals_contiguous_and_reference(case, device, poison_outputs):
    page, block, heads, kv_heads, dtype, splits, config = case
    lengths = [200, 1, 2 * page + 5, 37]  # the full cache, one token, mid-page ends
    layout = make_layout("hetero", heads, kv_heads, 200, block)
    q, k, v = _problem(heads, kv_heads, dtype, device, lengths)
    table, k_pages, v_pages = paginate(lengths, page, k, v,
                                       generator=torch.Generator().manual_seed(page * block))
    lens = torch.tensor(lengths, device=device)
    paged = sparse_attention_decode(q, k_pages, v_pages, lens, layout, num_splits=splits,
                                    config=config, block_table=table, max_cache_len=200)
    contiguous = sparse_attention_decode(q, k, v, lens, layout, num_splits=splits, config=config)
    assert paged.shape == q.shape and paged.dtype == dtype
    # The same blocks in the same order: the same sums, whatever page holds them.
    torch.testing.assert_close(paged, contiguous, rtol=0, atol=0)
    for b, n in enumerate(lengths):
        ref = reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n], layout)[0, 0]
        assert_verbose_close(paged[b], ref, rel_tol(dtype, device), f"sequence {b}")


def test_paged_pages_are_read_through_the_table(device):
    """Swapping two pages' contents, and their entries in the table, changes nothing; swapping
    only the contents changes the answer (a kernel that ignores the table fails one of them)."""
    lengths = [96, 64]
    layout = make_layout("homo", 2, 2, 96, 32)
    q, k, v = _problem(2, 2, torch.float32, device, lengths, max_len=96)
    table, k_pages, v_pages = paginate(lengths, 16, k, v, spare=0)
    lens = torch.tensor(lengths, device=device)
    out = sparse_attention_decode(q, k_pages, v_pages, lens, layout, block_table=table)
    a, b = int(table[0, 1]), int(table[1, 2])
    for pages in (k_pages, v_pages):
        pages[[a, b]] = pages[[b, a]]
    moved = sparse_attention_decode(q, k_pages, v_pages, lens, layout, block_table=table)
    assert not torch.allclose(moved, out)
    swapped = table.clone()
    swapped[0, 1], swapped[1, 2] = b, a
    again = sparse_attention_decode(q, k_pages, v_pages, lens, layout, block_table=swapped)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_gathered_pages_are_the_contiguous_cache(device):
    lengths = [50, 17]
    _, k, _ = _problem(2, 2, torch.float32, device, lengths, max_len=64)
    table, pages = paginate(lengths, 16, k)
    gathered = gather_pages(pages, table, 64)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(gathered[b, :n], k[b, :n], rtol=0, atol=0)


def test_workspace_allocates_nothing_and_is_reused(device, monkeypatch):
    lengths = [120, 33]
    layout = make_layout("hetero", 4, 2, 128, 32)
    q, k, v = _problem(4, 2, torch.float32, device, lengths, max_len=128)
    table, k_pages, v_pages = paginate(lengths, 32, k, v)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    eager = sparse_attention_decode(q, k_pages, v_pages, lens, layout, block_table=table,
                                    num_splits=2)
    workspace = decode_workspace(q, 2, layout, num_splits=2)
    assert workspace.splits == 2

    def no_allocation(*args, **kwargs):
        raise AssertionError("a step with a workspace allocated an output")

    monkeypatch.setattr(kernels.buffers, "new_output", no_allocation)
    out = sparse_attention_decode(q, k_pages, v_pages, lens, layout, block_table=table,
                                  workspace=workspace)
    assert out is workspace.out
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    q2 = torch.randn_like(q)
    again = sparse_attention_decode(q2, k_pages, v_pages, lens, layout, block_table=table,
                                    workspace=workspace)
    assert again is out  # overwritten in place
    monkeypatch.undo()
    fresh = sparse_attention_decode(q2, k_pages, v_pages, lens, layout, block_table=table,
                                    num_splits=2)
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)


def test_plan_and_split_count_are_built_once_per_batch_shape(device, monkeypatch):
    built = {"plan": 0, "splits": 0}
    plan, splits = kernels.decode.build_group_plan, kernels.decode.auto_splits

    def count_plan(*args):
        built["plan"] += 1
        return plan(*args)

    def count_splits(*args):
        built["splits"] += 1
        return splits(*args)

    monkeypatch.setattr(kernels.decode, "build_group_plan", count_plan)
    monkeypatch.setattr(kernels.decode, "auto_splits", count_splits)
    layout = make_layout("homo", 2, 1, 64, 16)
    q, k, v = _problem(2, 1, torch.float32, device, [64, 10], max_len=64)
    for _ in range(3):
        sparse_attention_decode(q, k, v, torch.tensor([64, 10]), layout)
    assert built == {"plan": 1, "splits": 1}
    sparse_attention_decode(q[:1], k[:1], v[:1], torch.tensor([64]), layout)
    assert built == {"plan": 1, "splits": 2}  # a new batch shape: its own split count


def _bad_call(device, **overrides):
    layout = make_layout("homo", 2, 2, 64, 16)
    q, k, v = _problem(2, 2, torch.float32, device, [64, 20], max_len=64)
    table, k_pages, v_pages = paginate([64, 20], 16, k, v, spare=0)
    args = dict(q=q, k_cache=k_pages, v_cache=v_pages, cache_seqlens=torch.tensor([64, 20]),
                layout=layout, block_table=table)
    args.update(overrides)
    return sparse_attention_decode(**args)


def test_bad_block_tables_are_refused_by_name(device):
    table = paginate([64, 20], 16, torch.zeros(2, 64, 2, 32, device=device), spare=0)[0]
    with pytest.raises(TypeError, match="block_table must be int32"):
        _bad_call(device, block_table=table.long())
    with pytest.raises(TypeError, match="block_table must be a torch.Tensor"):
        _bad_call(device, block_table=table.tolist())
    with pytest.raises(ValueError, match=r"block_table must be \(batch, max_pages\)"):
        _bad_call(device, block_table=table[0])
    with pytest.raises(ValueError, match="q has batch 2, the block table 1"):
        _bad_call(device, block_table=table[:1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="pages and lengths on a GPU are never read back "
                    "(a sync per step), so their values are checked on the CPU only")
def test_bad_pages_and_lengths_are_refused_by_value(device):
    table = paginate([64, 20], 16, torch.zeros(2, 64, 2, 32, device=device), spare=0)[0]
    out_of_range = table.clone()
    out_of_range[1, 1] = 99
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 99 is not a page of k_cache"):
        _bad_call(device, block_table=out_of_range)
    negative = table.clone()
    negative[0, 3] = -1
    with pytest.raises(ValueError, match=r"block_table\[0, 3\] = -1"):
        _bad_call(device, block_table=negative)
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[1, 64\]"):
        _bad_call(device, cache_seqlens=torch.tensor([65, 20]))
    with pytest.raises(ValueError, match=r"max_cache_len must be in \[1, 64\]"):
        _bad_call(device, max_cache_len=80)


@pytest.mark.parametrize("page_size", [8, 24, 512])
def test_page_sizes_are_powers_of_two_from_16_to_256(page_size, device):
    layout = make_layout("homo", 2, 2, 64, 16)
    q = torch.randn(1, 2, 32, device=device)
    pages = torch.randn(4, page_size, 2, 32, device=device)
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"page size \(k_cache.shape\[1\] with block_table\) "
                                         r"must be one of 16, 32, 64, 128, 256"):
        sparse_attention_decode(q, pages, pages, torch.tensor([1]), layout, block_table=table)


def test_bad_workspaces_are_refused(device):
    layout = make_layout("homo", 2, 2, 64, 16)
    q, k, v = _problem(2, 2, torch.float32, device, [64, 20], max_len=64)
    workspace = decode_workspace(q, 2, layout, num_splits=2)
    lens = torch.tensor([64, 20])
    with pytest.raises(ValueError, match="num_splits=3, but the workspace holds 2"):
        sparse_attention_decode(q, k, v, lens, layout, num_splits=3, workspace=workspace)
    with pytest.raises(ValueError, match="workspace was made for q"):
        sparse_attention_decode(q[:1], k[:1], v[:1], lens[:1], layout, workspace=workspace)
    with pytest.raises(TypeError, match="workspace must be a DecodeWorkspace"):
        sparse_attention_decode(q, k, v, lens, layout, workspace=torch.empty(1))
    with pytest.raises(ValueError, match="kv heads"):
        decode_workspace(q, 3, layout)
