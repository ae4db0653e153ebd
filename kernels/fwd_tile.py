"""The forward's work on one query tile, as ``@triton.jit`` helpers that the forward
(:mod:`kernels.fwd`) and variable-length (:mod:`kernels.varlen`) kernels both call: load q, walk
the tile's kept kv blocks (those that need no mask, then those that do), normalise and store.

The kernels differ only in where a tile's rows and keys live (a batch x head, or a sequence of a
packed or padded batch); they hand these helpers base pointers and the tile's rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _kv_step, _online_softmax, _plan_row, _score_mask


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
    for t in range(entry_start * N_SUB, entry_end * N_SUB):
        e, start_n, offs_n, n_ok = _kv_step(KvBlock, t, seq_k, row_end, BLOCK_SIZE, BLOCK_N)
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
            keep = _score_mask(n_ok, offs_n, offs_m_abs, RowBits, e, tile_first_block,
                               BLOCK_SIZE, SUB_BLOCKS, IS_CAUSAL)
            qk = tl.where(keep, qk, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, qk_scale)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_tile(q_base, k_base, v_base, stride_qm, stride_qk,
                   stride_kn, stride_kk, stride_vn, stride_vk,
                   k_desc, v_desc, desc_z, desc_h, RowPtr, NFull, KvBlock, RowBits,
                   row, tile, offs_m_abs, offs_m, offs_d, row_ok, d_ok, seq_k, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr):
    """Attention of one query tile over its plan row ``row``: the unnormalised output rows, the
    row max (log2 units) and the row sum. ``q_base``/``k_base``/``v_base`` point at the tile's
    batch x head (or sequence); ``k_desc``/``v_desc`` are read only with ``USE_TMA``."""
    SUB_BLOCKS: tl.constexpr = BLOCK_M // BLOCK_SIZE if BLOCK_M > BLOCK_SIZE else 1
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # A finite floor instead of -inf keeps exp2(m_i - m_new) defined for rows a tile masks fully.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    entry_start, entry_mid, entry_end, tile_first_block, row_end = _plan_row(
        RowPtr, NFull, row, tile, seq_k, BLOCK_M, BLOCK_SIZE, IS_CAUSAL)
    # The entries that need no mask, then those that do: the loop is compiled once for each.
    for masked in tl.static_range(2):
        acc, m_i, l_i = _attn_fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
            k_desc, v_desc, desc_z, desc_h, KvBlock, RowBits,
            entry_mid if masked else entry_start, entry_end if masked else entry_mid,
            offs_m_abs, tile_first_block, row_end, seq_k, qk_scale,
            BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, SUB_BLOCKS, masked == 1, IS_CAUSAL, DOT_FP32,
            USE_TMA)
    return acc, m_i, l_i


@triton.jit
def _normalise(acc, l_i):
    """The tile's output rows and row sums, with the sums of rows that saw no key set to 1
    (those rows come out zero)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None], l_safe


@triton.jit
def _store_rows(out, o_base, offs_m, offs_d, row_ok, d_ok, stride_om, stride_ok):
    """Store the tile's real rows (and dims) of ``out`` at ``o_base``."""
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok,
             out.to(o_base.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
