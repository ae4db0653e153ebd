"""Forward block-sparse attention: the Triton kernel, its tile plan and its launcher.

The grid is (query tiles, batch * heads). Each program owns ``BLOCK_M`` query rows at absolute
positions (so a tile never straddles two sparse query blocks when ``BLOCK_M <= block_size``, and
covers ``BLOCK_M // block_size`` whole blocks otherwise) and walks the kv blocks its plan lists:
first the blocks that need no mask, then the ones that do (causal diagonal, ragged end, or kept by
only some of the tile's query blocks). A config with ``impl="gluon"`` hands the call to the
warp-specialised Gluon kernel (:mod:`kernels.fwd_ws`) where it can take it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import buffers
from .configs import LaunchConfig, default_config
from .layout import BlockLayout


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Load tiles through tensor-memory descriptors where the device and strides allow it. Off only to
# measure the pointer path against it (benchmarks/phi3_scan.py --tma on,off).
TMA_LOADS = True


def tma_compatible(x: torch.Tensor) -> bool:
    """Whether tensor-memory copies can read ``x``: unit last stride, 16-byte aligned base and
    other strides."""
    size = x.element_size()
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
            and all(st > 0 and st * size % 16 == 0 for st in x.stride()[:-1]))


def tile_descriptor(x: torch.Tensor, rows: int, cols: int) -> TensorDescriptor | None:
    """A descriptor of ``(batch, heads, seq, dim)`` ``x`` with ``(1, 1, rows, cols)`` boxes, or None.

    Tensor-memory copies need Hopper or newer, a unit last stride and 16-byte aligned base and
    strides; anything else takes the pointer path. Boxes reaching past the tensor (any side)
    read zeros.
    """
    if not TMA_LOADS:
        return None
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device) < (9, 0):
            return None
    elif not interpreting():
        return None
    if not tma_compatible(x):
        return None
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, cols])


def tile_descriptors(rows: int, cols: int, *tensors: torch.Tensor) -> list | None:
    """Descriptors for all of ``tensors``, or None when any of them must take the pointer path."""
    descs = [tile_descriptor(t, rows, cols) for t in tensors]
    return None if any(d is None for d in descs) else descs


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


def build_tile_plan(layout: BlockLayout, block_m: int, seq_k: int) -> TilePlan:
    """Group the pattern's rows into query tiles of ``block_m`` and sort each row's kv blocks."""
    bs = layout.block_size
    nb = math.ceil(seq_k / bs)
    pattern = layout.pattern[:, :nb, :nb]
    heads, device = pattern.shape[0], pattern.device
    tiles = math.ceil(seq_k / block_m)
    kb = torch.arange(nb, device=device)
    tile_start = torch.arange(tiles, device=device) * block_m

    if block_m > bs:
        sub = block_m // bs
        padded = torch.zeros(heads, tiles * sub, nb, dtype=torch.bool, device=device)
        padded[:, :nb] = pattern
        per_block = padded.view(heads, tiles, sub, nb)
        kept = per_block.any(dim=2)
        weights = (1 << torch.arange(sub, device=device, dtype=torch.int32))
        bits = (per_block.to(torch.int32) * weights[None, None, :, None]).sum(dim=2, dtype=torch.int32)
        # A tile's query blocks past the sequence end never store rows, so they need no bit.
        q_block = torch.arange(tiles * sub, device=device).view(tiles, sub)
        real_bits = ((q_block < nb).to(torch.int32) * weights).sum(dim=1, dtype=torch.int32)
        partial = bits != real_bits[None, :, None]
    else:
        kept = pattern.repeat_interleave(bs // block_m, dim=1)[:, :tiles]
        bits = torch.ones_like(kept, dtype=torch.int32)
        partial = torch.zeros_like(kept)

    masked = partial | ((kb + 1) * bs > seq_k)[None, None, :]
    if layout.causal:
        masked = masked | ((kb + 1) * bs > tile_start[:, None])[None]

    hh, tt, jj = kept.nonzero(as_tuple=True)
    entry_masked = masked[hh, tt, jj]
    row = hh * tiles + tt
    order = torch.argsort(row * 2 + entry_masked.to(row.dtype), stable=True)
    counts = torch.bincount(row, minlength=heads * tiles)
    full = torch.bincount(row[~entry_masked], minlength=heads * tiles)
    row_ptr = torch.zeros(heads * tiles + 1, dtype=torch.int32, device=device)
    row_ptr[1:] = counts.cumsum(0)
    return TilePlan(row_ptr, full.to(torch.int32), jj[order].to(torch.int32),
                    bits[hh, tt, jj][order].to(torch.int32), tiles)


def tile_plan(layout: BlockLayout, block_m: int, seq_k: int) -> TilePlan:
    """The cached :func:`build_tile_plan` (built once per layout, tile height and key length)."""
    return layout.cached(("fwd_plan", block_m, seq_k, layout.pattern.device),
                         lambda: build_tile_plan(layout, block_m, seq_k))


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base,
                    stride_kn, stride_kk, stride_vn, stride_vk,
                    k_desc, v_desc, desc_z, desc_h,
                    KvBlock, RowBits, entry_start, entry_end,
                    offs_m_abs, tile_first_block, row_end, seq_k, qk_scale,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, SUB_BLOCKS: tl.constexpr, MASKED: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    # One flat loop over (entry, sub-tile) pairs: a nested loop would keep Triton from
    # software-pipelining the k/v loads across kept blocks.
    for t in range(entry_start * N_SUB, entry_end * N_SUB):
        e = t // N_SUB
        start_n = tl.load(KvBlock + e) * BLOCK_SIZE + (t % N_SUB) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = (offs_n < seq_k) & (offs_n < row_end)
        # -- load k (transposed) and v --
        if USE_TMA:
            # Tensor-memory copies: no address tiles in registers; keys past seq_k and dims
            # past head_dim come back as zeros, and the masked pass's score mask does the rest.
            kt = tl.trans(tl.reshape(k_desc.load([desc_z, desc_h, start_n, 0]), [BLOCK_N, BLOCK_D]))
            v = tl.reshape(v_desc.load([desc_z, desc_h, start_n, 0]), [BLOCK_N, BLOCK_D])
        elif MASKED:
            # Sub-tiles wholly past the last key a row of this tile may see load nothing.
            kt_ptrs = k_base + offs_d[:, None] * stride_kk + offs_n[None, :] * stride_kn
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            kt_ptrs = k_base + offs_d[:, None] * stride_kk + offs_n[None, :] * stride_kn
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk
            if BLOCK_D == HEAD_DIM:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt)
        if MASKED:
            keep = n_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m_abs[:, None])
            if SUB_BLOCKS > 1:
                bits = tl.load(RowBits + e)
                row_keeps = ((bits >> (offs_m_abs // BLOCK_SIZE - tile_first_block)) & 1) != 0
                keep = keep & row_keeps[:, None]
            qk = tl.where(keep, qk, float("-inf"))
        # -- online softmax update, in log2 units: the scale rides in the max and one FMA --
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sparse_attn_fwd(Q, K, V, KDesc, VDesc, Out, Lse,
                     RowPtr, NFull, KvBlock, RowBits,
                     stride_qz, stride_qh, stride_qm, stride_qk,
                     stride_kz, stride_kh, stride_kn, stride_kk,
                     stride_vz, stride_vh, stride_vn, stride_vk,
                     stride_oz, stride_oh, stride_om, stride_ok,
                     num_heads, q_per_kv, heads_per_pattern, seq_q, seq_k, tiles, first_tile,
                     qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     RETURN_LSE: tl.constexpr, DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr):
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    tl.static_assert((BLOCK_SIZE % BLOCK_M == 0) or (BLOCK_M % BLOCK_SIZE == 0))
    SUB_BLOCKS: tl.constexpr = BLOCK_M // BLOCK_SIZE if BLOCK_M > BLOCK_SIZE else 1
    tile = tl.program_id(0) + first_tile
    off_zh = tl.program_id(1)
    off_z = (off_zh // num_heads).to(tl.int64)
    off_h = off_zh % num_heads
    off_kvh = (off_h // q_per_kv).to(tl.int64)
    row = (off_h // heads_per_pattern) * tiles + tile

    # Queries are the last seq_q of the seq_k positions; tiles are aligned to absolute positions.
    q_offset = seq_k - seq_q
    offs_m_abs = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = offs_m_abs - q_offset
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (offs_m >= 0) & (offs_m < seq_q)
    d_ok = offs_d < HEAD_DIM

    q_base = Q + off_z * stride_qz + off_h.to(tl.int64) * stride_qh
    k_base = K + off_z * stride_kz + off_kvh * stride_kh
    v_base = V + off_z * stride_vz + off_kvh * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # A finite floor instead of -inf keeps exp2(m_i - m_new) defined for rows a tile masks fully.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    entry_start = tl.load(RowPtr + row)
    entry_end = tl.load(RowPtr + row + 1)
    entry_mid = entry_start + tl.load(NFull + row)
    tile_first_block = tile * BLOCK_M // BLOCK_SIZE
    if IS_CAUSAL:
        row_end = tl.minimum((tile + 1) * BLOCK_M, seq_k)
    else:
        row_end = seq_k
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base,
                                    stride_kn, stride_kk, stride_vn, stride_vk,
                                    KDesc, VDesc, off_z.to(tl.int32), off_kvh.to(tl.int32),
                                    KvBlock, RowBits, entry_start, entry_mid,
                                    offs_m_abs, tile_first_block, row_end, seq_k, qk_scale,
                                    BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, SUB_BLOCKS,
                                    False, IS_CAUSAL, DOT_FP32, USE_TMA)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base,
                                    stride_kn, stride_kk, stride_vn, stride_vk,
                                    KDesc, VDesc, off_z.to(tl.int32), off_kvh.to(tl.int32),
                                    KvBlock, RowBits, entry_mid, entry_end,
                                    offs_m_abs, tile_first_block, row_end, seq_k, qk_scale,
                                    BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, SUB_BLOCKS,
                                    True, IS_CAUSAL, DOT_FP32, USE_TMA)

    # -- epilogue --
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_base = Out + off_z * stride_oz + off_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        # Natural-log log-sum-exp; m_i is in log2 units.
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
        lse_ptrs = Lse + off_zh.to(tl.int64) * seq_q + offs_m
        tl.store(lse_ptrs, lse, mask=row_ok)


def sparse_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                         sm_scale: float, config: LaunchConfig, return_lse: bool = True,
                         out: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel on checked ``(batch, heads, seq, dim)`` views (any strides).

    Returns ``out`` (q's shape and dtype, a ``(batch, heads, seq_q, dim)`` view of a
    ``(batch, seq_q, heads, dim)`` tensor) and the natural-log LSE ``(batch, heads, seq_q)`` float32, or None.
    """
    if config.impl == "gluon":
        from . import fwd_ws  # late: fwd_ws builds on this module
        if fwd_ws.eligible(q, k, v, layout):
            return fwd_ws.sparse_attention_fwd_ws(q, k, v, layout, sm_scale, return_lse, out,
                                                  stages=config.num_stages,
                                                  boxes=config.block_n // fwd_ws.BOX_N)
        # Strides or a device the Gluon kernel cannot take: the Triton default runs instead.
        config = default_config("fwd", q.device, layout.block_size, q.shape[3], q.dtype,
                                allow_gluon=False)
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    plan = tile_plan(layout, config.block_m, seq_k)
    if out is None:
        # (batch, seq, heads, dim) memory order, the common layout, whatever q's strides are.
        out = buffers.new_output((batch, seq_q, heads, head_dim), q, q.dtype).transpose(1, 2)
    lse = buffers.new_output((batch, heads, seq_q) if return_lse else (1,), q, torch.float32)
    first_tile = (seq_k - seq_q) // config.block_m
    grid = (plan.tiles - first_tile, batch * heads)
    block_d = max(16, triton.next_power_of_2(head_dim))
    descs = tile_descriptors(config.block_n, block_d, k, v)
    _sparse_attn_fwd[grid](
        q, k, v, *(descs or (k, v)), out, lse,
        plan.row_ptr, plan.n_full, plan.kv_block, plan.row_bits,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, heads // kv_heads, heads // layout.heads, seq_q, seq_k, plan.tiles, first_tile,
        sm_scale * 1.4426950408889634,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_D=block_d, HEAD_DIM=head_dim,
        BLOCK_SIZE=layout.block_size, IS_CAUSAL=layout.causal, RETURN_LSE=return_lse,
        DOT_FP32=interpreting() and q.dtype == torch.bfloat16, USE_TMA=descs is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, (lse if return_lse else None)
