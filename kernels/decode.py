"""Decoding with a KV cache: one new token per sequence, each sequence with its own cache length.

- GQA-grouped: one program serves every query head of a kv group, so each cached kv block is
  loaded once for the group. With one pattern per query head, the group reads the union of its
  heads' kept blocks, and a per-entry head mask drops the rows whose head did not keep it.
- Split-K (flash-decoding): a sequence's kept blocks are split across ``num_splits`` programs, each
  writing a partial output and its log-sum-exp. The last of a kv group's splits to finish (an
  atomic ticket per group says which) merges them, so a step is one launch however it splits: a
  single long sequence, or few heads, still fill the GPU, and an eager step pays one launch.
- Paged (a ``block_table``): the caches are ``(num_pages, page_size, kv_heads, dim)`` pages, as
  vLLM, FlashAttention and FlashInfer keep them, and each key's page is looked up per step; the
  pattern still applies by absolute position. The unpaged kernel compiles as it did before
  paging existed (``PAGED`` is a constexpr, the table's arguments specialise away).
- With one split (many sequences, or short contexts) the program writes the output itself: no
  partial buffers, no ticket.
- No host work per step once a batch shape has been seen: the group plan and the split count are
  built once and kept on the layout, and a :class:`DecodeWorkspace` holds the outputs and the
  launches of the calls it has checked, so a step with one is checked once, launches one kernel
  and can be captured in a CUDA graph.

Its launch config (kernel "decode" of :mod:`kernels.registry`) sets ``block_n`` (cached keys per
step), ``num_warps`` and ``num_stages``; ``block_m`` is always 16, since the query tile is the
GQA group's heads padded to a power of two (at least 16). The split count is not a config field:
``num_splits`` pins it, else :func:`auto_splits` chooses it once per batch shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from . import buffers
from .common import (
    _kv_step,
    _online_softmax,
    dot_fp32,
    index_table,
    padded_dim,
    qk_scale,
)
from .configs import LaunchConfig
from .layout import BlockLayout
from .reference import layout_head_index

MAX_SPLITS = 64
# Page sizes of a paged cache (tokens per page): powers of two, as vLLM and FlashInfer use them.
PAGE_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class GroupPlan:
    """Kept kv blocks per (kv head, query block), union over the group's query heads.

    Bit ``i`` of ``head_bits[e]`` is set when the group's ``i``-th query head keeps the entry.
    """

    row_ptr: torch.Tensor  # int32 (kv_heads * q_blocks + 1,)
    kv_block: torch.Tensor  # int32 (nnz,)
    head_bits: torch.Tensor  # int32 (nnz,)
    q_blocks: int
    max_entries: int


def build_group_plan(layout: BlockLayout, num_heads: int, kv_heads: int) -> GroupPlan:
    group = num_heads // kv_heads
    if group > 31:
        raise ValueError(f"decoding supports at most 31 query heads per kv head, got {group}")
    device = layout.pattern.device
    head_map = layout_head_index(num_heads, kv_heads, layout.heads).to(device)
    qb, kb = layout.q_blocks, layout.k_blocks
    per_head = layout.pattern[head_map].view(kv_heads, group, qb, kb)
    kept = per_head.any(dim=1)
    weights = 1 << torch.arange(group, device=device, dtype=torch.int32)
    bits = (per_head.to(torch.int32) * weights[None, :, None, None]).sum(dim=1, dtype=torch.int32)
    table = index_table(kept)
    return GroupPlan(table.row_ptr, table.col.to(torch.int32),
                     bits[table.head, table.row, table.col].to(torch.int32), qb,
                     int(table.counts.max()) if table.counts.numel() else 0)


def group_plan(layout: BlockLayout, num_heads: int, kv_heads: int) -> GroupPlan:
    return layout.cached(("decode_plan", num_heads, kv_heads, layout.pattern.device),
                         lambda: build_group_plan(layout, num_heads, kv_heads))


@triton.jit
def _cache_rows(pages, offs, ok, stride_tp, stride_page, stride_row,
                PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Offsets of the cache rows that hold absolute positions ``offs`` of one sequence: its rows
    ``offs``, or, paged, row ``offs % PAGE_SIZE`` of page ``pages[offs // PAGE_SIZE]`` (``pages``:
    the sequence's block-table row; positions not ``ok`` read page 0). A step of keys may span
    several pages or part of one."""
    if PAGED:
        page = tl.load(pages + (offs // PAGE_SIZE) * stride_tp, mask=ok, other=0)
        return page.to(tl.int64) * stride_page + (offs % PAGE_SIZE).to(tl.int64) * stride_row
    else:
        return offs.to(tl.int64) * stride_row


@triton.jit
def _decode_split(Q, K, V, Out, PartOut, PartLse, Tickets, CacheLens, BlockTable,
                  RowPtr, KvBlock, HeadBits,
                  stride_qz, stride_qh, stride_qk,
                  stride_kz, stride_kn, stride_kh, stride_kk,
                  stride_vz, stride_vn, stride_vh, stride_vk,
                  stride_oz, stride_oh, stride_ok,
                  stride_tz, stride_tp,
                  kv_heads, group, q_blocks, num_splits, qk_scale,
                  BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr,
                  BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr, PAGED: tl.constexpr,
                  PAGE_SIZE: tl.constexpr):
    # PAGED: the caches are (num_pages, PAGE_SIZE, kv_heads, dim) pages, stride_kz/vz a page's
    # stride, and row b of BlockTable lists sequence b's pages in order. Unpaged, BlockTable is
    # None and its strides 1, so they specialise away and the kernel compiles as before paging.
    split = tl.program_id(0)
    off_z = tl.program_id(1) // kv_heads
    off_g = tl.program_id(1) % kv_heads
    cache_len = tl.load(CacheLens + off_z)
    pos = cache_len - 1  # the new token's position; its k/v are already in the cache
    row = off_g * q_blocks + pos // BLOCK_SIZE
    row_start = tl.load(RowPtr + row)
    n_entries = tl.load(RowPtr + row + 1) - row_start
    per_split = tl.cdiv(n_entries, num_splits)
    entry_start = row_start + split * per_split
    entry_end = tl.minimum(entry_start + per_split, row_start + n_entries)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < group
    d_ok = offs_d < HEAD_DIM
    heads = off_g * group + offs_h
    z64 = off_z.to(tl.int64)
    q = tl.load(Q + z64 * stride_qz + heads[:, None].to(tl.int64) * stride_qh
                + offs_d[None, :] * stride_qk, mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    if PAGED:
        k_base = K + off_g.to(tl.int64) * stride_kh
        v_base = V + off_g.to(tl.int64) * stride_vh
        pages = BlockTable + z64 * stride_tz  # the sequence's row of the block table
    else:
        k_base = K + z64 * stride_kz + off_g.to(tl.int64) * stride_kh
        v_base = V + z64 * stride_vz + off_g.to(tl.int64) * stride_vh
        pages = BlockTable

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    for t in range(entry_start * N_SUB, entry_end * N_SUB):
        # The new token sees every cached key: both bounds are the cache length.
        e, _, offs_n, n_ok = _kv_step(KvBlock, t, cache_len, cache_len, BLOCK_SIZE, BLOCK_N)
        kt = tl.load(k_base + offs_d[:, None] * stride_kk
                     + _cache_rows(pages, offs_n[None, :], n_ok[None, :], stride_tp, stride_kz,
                                   stride_kn, PAGED, PAGE_SIZE),
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(v_base + _cache_rows(pages, offs_n[:, None], n_ok[:, None], stride_tp,
                                         stride_vz, stride_vn, PAGED, PAGE_SIZE)
                    + offs_d[None, :] * stride_vk,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        head_keeps = ((tl.load(HeadBits + e) >> offs_h) & 1) != 0
        qk = tl.dot(q, kt)
        qk = tl.where(head_keeps[:, None] & n_ok[None, :], qk, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, qk_scale)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    group_out = Out + z64 * stride_oz + (off_g * group).to(tl.int64) * stride_oh
    if SPLIT:
        # Partial output and its log2-sum-exp; a split that kept nothing weighs zero.
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        first_part = (z64 * (kv_heads * group) + heads.to(tl.int64)) * num_splits
        tl.store(PartOut + (first_part + split)[:, None] * BLOCK_D + offs_d[None, :], out,
                 mask=h_ok[:, None] & d_ok[None, :])
        tl.store(PartLse + first_part + split, lse, mask=h_ok)
        # The group's last split to finish merges them all: one launch, no merge kernel. The
        # barrier orders every thread's stores before the release of the ticket; the acquire
        # orders the merge's loads after the other splits' releases.
        tl.debug_barrier()
        ticket = tl.atomic_add(Tickets + tl.program_id(1), 1, sem="acq_rel", scope="gpu")
        if ticket == num_splits - 1:
            _merge_splits(group_out, PartOut, PartLse, z64 * (kv_heads * group) + off_g * group,
                          group, num_splits, stride_oh, stride_ok, BLOCK_S, BLOCK_D, HEAD_DIM)
            tl.store(Tickets + tl.program_id(1), 0)  # ready for the next step (or graph replay)
    else:
        tl.store(group_out + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_ok,
                 out.to(Out.dtype.element_ty),
                 mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits(group_out, PartOut, PartLse, first_head, group, num_splits, stride_oh,
                  stride_ok, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """Write the output of one kv group's heads (``group_out`` the first one's output row,
    ``first_head`` its row among the partials) from their splits' partial outputs, weighted by
    their log2-sum-exps; a head no split kept gets zeros, as one split would write. One head at
    a time, its splits in one tile: a head's loads are all in flight together. The partials are
    read from L2 (``.cg``), where the other programs' stores went."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    for h in range(group):
        parts = (first_head + h) * num_splits + offs_s
        lse = tl.load(PartLse + parts, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        tile = tl.load(PartOut + parts[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None],
                       other=0.0, cache_modifier=".cg")
        top = tl.max(lse, 0)
        weight = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
        total = tl.sum(weight, 0)
        out = tl.sum(tile * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(group_out + h * stride_oh + offs_d * stride_ok,
                 out.to(group_out.dtype.element_ty), mask=offs_d < HEAD_DIM)


def auto_splits(batch: int, kv_heads: int, max_entries: int, device: torch.device) -> int:
    """Enough programs for two per SM, never fewer than four blocks per split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(2 * sms / max(1, batch * kv_heads))
    return max(1, min(want, max(1, max_entries // 4), MAX_SPLITS))


def decode_splits(layout: BlockLayout, batch: int, heads: int, kv_heads: int,
                  device: torch.device) -> int:
    """:func:`auto_splits` for one batch shape, worked out once and kept on the layout (with its
    group plan), so a decoding loop asks the device nothing per step."""
    return layout.cached(("decode_splits", batch, heads, kv_heads, device), lambda: auto_splits(
        batch, kv_heads, group_plan(layout, heads, kv_heads).max_entries, device))


@dataclass(frozen=True)
class DecodeWorkspace:
    """Everything a decoding step writes, allocated once per batch shape: the output and, when
    the step runs ``splits`` > 1 split-K programs per sequence, their partial outputs and
    log2-sum-exps, and one ticket per (sequence, kv head) that tells the group's last split to
    finish that it merges (back to zero after, ready for the next step). A call given one
    allocates nothing (so it can be captured in a CUDA graph) and overwrites ``out``. With one
    split the step writes ``out`` directly: there are no partials or tickets (None).

    ``launches`` remembers the launches of calls already checked, by what the checks read (the
    tensors' shapes, strides, dtypes and devices, and the other arguments), so a decoding loop
    checks its arguments once, not every step."""

    out: torch.Tensor  # (batch, heads, dim), q's dtype
    part_out: torch.Tensor | None  # float32 (batch * heads * splits, BLOCK_D); None for 1 split
    part_lse: torch.Tensor | None  # float32 (batch * heads * splits,); None for 1 split
    splits: int
    tickets: torch.Tensor | None = None  # int32 (batch * kv_heads,), zeros; None for 1 split
    launches: dict = field(default_factory=dict, compare=False, repr=False)


def new_workspace(q: torch.Tensor, splits: int, kv_heads: int) -> DecodeWorkspace:
    """Fresh buffers for decoding ``q`` (batch, heads, dim) against ``kv_heads`` kv heads in
    ``splits`` splits."""
    batch, heads, head_dim = q.shape
    out = buffers.new_output((batch, heads, head_dim), q, q.dtype)
    if splits == 1:
        return DecodeWorkspace(out, None, None, 1)
    rows = batch * heads * splits
    return DecodeWorkspace(out, buffers.new_output((rows, padded_dim(head_dim)), q, torch.float32),
                           buffers.new_output((rows,), q, torch.float32), splits,
                           torch.zeros(batch * kv_heads, dtype=torch.int32, device=q.device))


@dataclass(frozen=True)
class DecodeLaunch:
    """One decoding step's launch with everything but the tensors' addresses worked out: the
    grid, the group plan, the strides and sizes, the constexprs. Calling it launches one kernel
    on a step's tensors, which must have the shapes, strides, dtypes and devices it was made
    for."""

    grid: tuple[int, int]
    plan: GroupPlan
    scalars: tuple
    constants: dict

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 cache_seqlens: torch.Tensor, block_table: torch.Tensor | None,
                 workspace: DecodeWorkspace) -> torch.Tensor:
        plan = self.plan
        _decode_split[self.grid](
            q, k_cache, v_cache, workspace.out, workspace.part_out, workspace.part_lse,
            workspace.tickets, cache_seqlens, block_table, plan.row_ptr, plan.kv_block,
            plan.head_bits, *self.scalars, **self.constants)
        return workspace.out


def decode_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  layout: BlockLayout, sm_scale: float, config: LaunchConfig,
                  block_table: torch.Tensor | None, workspace: DecodeWorkspace) -> DecodeLaunch:
    """The launch of steps shaped like these checked tensors (q (batch, heads, dim), caches
    (batch, max_len, kv_heads, dim), or with ``block_table`` (int32 (batch, max_pages)) pages
    (num_pages, page_size, kv_heads, dim)) into ``workspace``, with a checked decode config
    (``block_n`` keys per step, ``num_warps``, ``num_stages``)."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    splits, out = workspace.splits, workspace.out
    paged = block_table is not None
    # Unpaged, the table's pointer and strides are None and 1: constants, not kernel arguments;
    # so are the partials' and tickets' pointers with one split (None: that branch of the kernel
    # never reads them).
    table_strides = block_table.stride() if paged else (1, 1)
    plan = group_plan(layout, heads, kv_heads)
    scalars = (*q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *table_strides,
               kv_heads, group, plan.q_blocks, splits, qk_scale(sm_scale))
    constants = dict(
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=config.block_n,
        BLOCK_D=padded_dim(head_dim), HEAD_DIM=head_dim, BLOCK_SIZE=layout.block_size,
        SPLIT=splits > 1, BLOCK_S=max(2, triton.next_power_of_2(splits)),
        DOT_FP32=dot_fp32(q.dtype), PAGED=paged, PAGE_SIZE=k_cache.shape[1] if paged else 1,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return DecodeLaunch((splits, batch * kv_heads), plan, scalars, constants)


def sparse_attention_decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                cache_seqlens: torch.Tensor, layout: BlockLayout, sm_scale: float,
                                num_splits: int | None, config: LaunchConfig,
                                block_table: torch.Tensor | None = None,
                                workspace: DecodeWorkspace | None = None) -> torch.Tensor:
    """Launch on checked tensors (as :func:`decode_launch` takes them) into ``workspace`` (its
    splits checked against ``num_splits`` by the caller), or into new buffers split
    ``num_splits`` ways (None: :func:`decode_splits`). One kernel either way: with more than
    one split, the last split of each kv group to finish merges the group's partials."""
    if workspace is None:
        batch, heads = q.shape[:2]
        kv_heads = k_cache.shape[2]
        splits = num_splits or decode_splits(layout, batch, heads, kv_heads, q.device)
        workspace = new_workspace(q, splits, kv_heads)
    launch = decode_launch(q, k_cache, v_cache, layout, sm_scale, config, block_table, workspace)
    return launch(q, k_cache, v_cache, cache_seqlens, block_table, workspace)
