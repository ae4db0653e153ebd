"""Pieces every kernel shares: constants, the interpreter switch, tensor-memory descriptors, the
index tables built from a layout, and the ``@triton.jit`` helpers of the score loops.

Triton inlines a jit call, so a helper here compiles to the same code as the lines it replaced.
Every kernel's record lists this module in its sources (:mod:`kernels.registry`): an edit here
changes every kernel's cache hash.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .layout import BlockLayout

# Scores are scaled into log2 units so the softmax runs on exp2; ln(2) turns a log2-sum-exp back
# into the natural log. Constexpr objects, because a jit function may read no other global;
# host code takes the float (``LOG2E.value``).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def interpreting() -> bool:
    """Whether kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel upcasts its dot operands: the interpreter has no bfloat16 matmul."""
    return interpreting() and dtype == torch.bfloat16


def padded_dim(head_dim: int) -> int:
    """The head-dim extent of a tile (``BLOCK_D``): a power of two, at least 16 (``tl.dot``)."""
    return max(16, triton.next_power_of_2(head_dim))


def qk_scale(sm_scale: float) -> float:
    """``sm_scale`` in log2 units, the scale the kernels multiply scores by."""
    return sm_scale * LOG2E.value


# -- tensor-memory descriptors -------------------------------------------------------------------


def tma_compatible(x: torch.Tensor) -> bool:
    """Whether tensor-memory copies can read ``x``: unit last stride, 16-byte aligned base and
    other strides."""
    size = x.element_size()
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
            and all(st > 0 and st * size % 16 == 0 for st in x.stride()[:-1]))


def tile_descriptor(x: torch.Tensor, rows: int, cols: int,
                    tma: bool = True) -> TensorDescriptor | None:
    """A descriptor of ``(batch, heads, seq, dim)`` ``x`` with ``(1, 1, rows, cols)`` boxes, or None.

    Tensor-memory copies need Hopper or newer, a unit last stride and 16-byte aligned base and
    strides; anything else, and ``tma=False`` (to measure the pointer path), takes the pointer
    path. Boxes reaching past the tensor (any side) read zeros.
    """
    if not tma:
        return None
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device) < (9, 0):
            return None
    elif not interpreting():
        return None
    if not tma_compatible(x):
        return None
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, cols])


def tile_descriptors(rows: int, cols: int, *tensors: torch.Tensor, tma: bool = True) -> list | None:
    """Descriptors for all of ``tensors``, or None when any of them must take the pointer path."""
    descs = [tile_descriptor(t, rows, cols, tma) for t in tensors]
    return None if any(d is None for d in descs) else descs


# -- index tables --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexTable:
    """The CSR form of a ``(heads, rows, cols)`` bool table: one row per (head, row), in order.

    Row ``r`` holds entries ``[row_ptr[r], row_ptr[r+1])``, columns ascending; with a mask, the
    ``n_full[r]`` entries that need none come first. ``head``, ``row`` and ``col`` index the
    table for each entry, in entry order, so per-entry data is ``data[t.head, t.row, t.col]``.
    """

    row_ptr: torch.Tensor  # int32 (heads * rows + 1,)
    head: torch.Tensor  # int64 (nnz,)
    row: torch.Tensor  # int64 (nnz,)
    col: torch.Tensor  # int64 (nnz,)
    counts: torch.Tensor  # int64 (heads * rows,): entries per row
    n_full: torch.Tensor | None  # int32 (heads * rows,), with a mask


def index_table(kept: torch.Tensor, masked: torch.Tensor | None = None) -> IndexTable:
    """The CSR form of ``kept``; ``masked`` (same shape) sorts each row's unmasked entries first."""
    heads, rows = kept.shape[0], kept.shape[1]
    hh, rr, cc = kept.nonzero(as_tuple=True)  # row-major: rows in order, columns ascending
    row = hh * rows + rr
    counts = torch.bincount(row, minlength=heads * rows)
    row_ptr = torch.zeros(heads * rows + 1, dtype=torch.int32, device=kept.device)
    row_ptr[1:] = counts.cumsum(0)
    if masked is None:
        return IndexTable(row_ptr, hh, rr, cc, counts, None)
    entry_masked = masked[hh, rr, cc]
    order = torch.argsort(row * 2 + entry_masked.to(row.dtype), stable=True)
    full = torch.bincount(row[~entry_masked], minlength=heads * rows)
    return IndexTable(row_ptr, hh[order], rr[order], cc[order], counts, full.to(torch.int32))


@dataclass(frozen=True)
class TilePlan:
    """Kept kv blocks per (pattern head, query tile), unmasked ones first in each row.

    Row ``h * tiles + t`` lists entries ``[row_ptr[r], row_ptr[r+1])``; the first ``n_full[r]``
    need no mask. ``row_bits[e]`` has bit ``s`` set when the tile's ``s``-th query block keeps
    the entry's kv block (only read when a tile spans several sparse blocks).
    """

    row_ptr: torch.Tensor  # int32 (pattern_heads * tiles + 1,)
    n_full: torch.Tensor  # int32 (pattern_heads * tiles,)
    kv_block: torch.Tensor  # int32 (nnz,)
    row_bits: torch.Tensor  # int32 (nnz,)
    tiles: int


def build_tile_plan(layout: BlockLayout, block_m: int, seq_k: int, q_end: int | None = None,
                    k_start: int = 0) -> TilePlan:
    """Group the pattern's rows into query tiles of ``block_m`` and sort each row's kv blocks.

    The queries are the positions before ``q_end`` (default ``seq_k``) and the keys those in
    ``[k_start, seq_k)``: one whole sequence by default; a partition of its keys
    (:func:`kernels.sparse_attention_partition`) keeps only the kv blocks from ``k_start`` (a
    multiple of the block size), and masks its last block where it ends inside one.
    """
    bs = layout.block_size
    q_end = seq_k if q_end is None else q_end
    nq, nb, kb0 = math.ceil(q_end / bs), math.ceil(seq_k / bs), k_start // bs
    pattern = layout.pattern[:, :nq, kb0:nb]
    heads, device = pattern.shape[0], pattern.device
    tiles = math.ceil(q_end / block_m)
    kb = torch.arange(kb0, nb, device=device)
    tile_start = torch.arange(tiles, device=device) * block_m

    if block_m > bs:
        sub = block_m // bs
        padded = torch.zeros(heads, tiles * sub, nb - kb0, dtype=torch.bool, device=device)
        padded[:, :nq] = pattern
        per_block = padded.view(heads, tiles, sub, nb - kb0)
        kept = per_block.any(dim=2)
        weights = (1 << torch.arange(sub, device=device, dtype=torch.int32))
        bits = (per_block.to(torch.int32) * weights[None, None, :, None]).sum(dim=2, dtype=torch.int32)
        # A tile's query blocks past the last query never store rows, so they need no bit.
        q_block = torch.arange(tiles * sub, device=device).view(tiles, sub)
        real_bits = ((q_block < nq).to(torch.int32) * weights).sum(dim=1, dtype=torch.int32)
        partial = bits != real_bits[None, :, None]
    else:
        kept = pattern.repeat_interleave(bs // block_m, dim=1)[:, :tiles]
        bits = torch.ones_like(kept, dtype=torch.int32)
        partial = torch.zeros_like(kept)

    masked = partial | ((kb + 1) * bs > seq_k)[None, None, :]
    if layout.causal:
        masked = masked | ((kb + 1) * bs > tile_start[:, None])[None]
    table = index_table(kept, masked)
    return TilePlan(table.row_ptr, table.n_full, (table.col + kb0).to(torch.int32),
                    bits[table.head, table.row, table.col].to(torch.int32), tiles)


def tile_plan(layout: BlockLayout, block_m: int, seq_k: int, q_end: int | None = None,
              k_start: int = 0) -> TilePlan:
    """The cached :func:`build_tile_plan` (built once per layout, tile height, query end and key
    range)."""
    q_end = seq_k if q_end is None else q_end
    return layout.cached(("fwd_plan", block_m, seq_k, q_end, k_start, layout.pattern.device),
                         lambda: build_tile_plan(layout, block_m, seq_k, q_end, k_start))


# -- jit helpers -----------------------------------------------------------------------------------


@triton.jit
def _tile_program(first_tile, num_heads, q_per_kv, heads_per_pattern, tiles):
    """The query tile of this program of a (query tiles, batch * heads) grid over a tile plan:
    its tile, batch x head, batch, head, kv head and plan row."""
    tile = tl.program_id(0) + first_tile
    off_zh = tl.program_id(1)
    off_z = (off_zh // num_heads).to(tl.int64)
    off_h = off_zh % num_heads
    off_kvh = (off_h // q_per_kv).to(tl.int64)
    row = (off_h // heads_per_pattern) * tiles + tile
    return tile, off_zh, off_z, off_h, off_kvh, row


@triton.jit
def _tile_rows(tile, q_offset, seq_q,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A query tile's rows: absolute positions (tiles are aligned to them), indices among the
    ``seq_q`` queries (the last of the keys' positions), head-dim offsets, and which are real."""
    offs_m_abs = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = offs_m_abs - q_offset
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (offs_m >= 0) & (offs_m < seq_q)
    d_ok = offs_d < HEAD_DIM
    return offs_m_abs, offs_m, offs_d, row_ok, d_ok


@triton.jit
def _plan_row(RowPtr, NFull, row, tile, seq_k,
              BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """A query tile's entries in a tile plan, ``[start, mid)`` unmasked and ``[mid, end)``
    masked; the sparse block of its first row; one past the last key any of its rows sees."""
    entry_start = tl.load(RowPtr + row)
    entry_end = tl.load(RowPtr + row + 1)
    entry_mid = entry_start + tl.load(NFull + row)
    tile_first_block = tile * BLOCK_M // BLOCK_SIZE
    if IS_CAUSAL:
        row_end = tl.minimum((tile + 1) * BLOCK_M, seq_k)
    else:
        row_end = seq_k
    return entry_start, entry_mid, entry_end, tile_first_block, row_end


@triton.jit
def _kv_step(KvBlock, t, seq_k, row_end, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Step ``t`` of a flat walk over (entry, ``BLOCK_N``-key sub-tile of its kv block): the
    entry, its first key, its keys, and which of them exist and some row may see (below
    ``seq_k`` and ``row_end``; read by masked steps only). One flat loop, not two nested ones,
    lets Triton software-pipeline the loads across kept blocks."""
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    e = t // N_SUB
    start_n = tl.load(KvBlock + e) * BLOCK_SIZE + (t % N_SUB) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    return e, start_n, offs_n, (offs_n < seq_k) & (offs_n < row_end)


@triton.jit
def _score_mask(n_ok, offs_n, offs_m_abs, RowBits, e, tile_first_block,
                BLOCK_SIZE: tl.constexpr, SUB_BLOCKS: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Which (query row, key) scores of a masked step of entry ``e`` count: keys in range
    (``n_ok``), keys at or before the row's position when causal, and, in a tile spanning
    ``SUB_BLOCKS`` sparse query blocks, only rows whose own block keeps the entry (bit ``s`` of
    its row bits for the tile's ``s``-th block). The Gluon forward (kernels/fwd_ws.py) writes
    the same mask in Gluon, with one entry per key."""
    keep = n_ok[None, :]
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m_abs[:, None])
    if SUB_BLOCKS > 1:
        bits = tl.load(RowBits + e)
        row_keeps = ((bits >> (offs_m_abs // BLOCK_SIZE - tile_first_block)) & 1) != 0
        keep = keep & row_keeps[:, None]
    return keep


@triton.jit
def _online_softmax(qk, m_i, l_i, qk_scale):
    """One online-softmax step over a tile of raw scores, in log2 units (the scale rides in the
    max and one FMA): the tile's unnormalised probabilities, the factor that rescales what was
    accumulated so far, and the new row max and row sum."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i
