"""Forward block-sparse attention: the Triton kernel and its launcher.

The grid is (query tiles, batch * heads). Each program owns ``BLOCK_M`` query rows at absolute
positions (so a tile never straddles two sparse query blocks when ``BLOCK_M <= block_size``, and
covers ``BLOCK_M // block_size`` whole blocks otherwise) and walks the kv blocks its tile plan
(:func:`kernels.common.tile_plan`) lists: first the blocks that need no mask, then the ones that
do (causal diagonal, ragged end, or kept by only some of the tile's query blocks). The tile's
work is :mod:`kernels.fwd_tile`'s, shared with the varlen kernel. A config with ``impl="gluon"``
hands the call to the warp-specialised Gluon kernel (:mod:`kernels.fwd_ws`) where the dispatcher
(:mod:`kernels.dispatch`) says it can take it, or to its form with steps each tile half takes
alone (:mod:`kernels.fwd_halves`) where the pattern's tile halves keep different blocks enough
for that to pay (:mod:`kernels.halves_plan`). The same kernel runs a partition of the keys
(:mod:`kernels.partitions`): queries and keys from given absolute positions, the plan
restricted to the keys' blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers, fwd_halves, fwd_ws, halves_plan
from .common import (
    LN2,
    TilePlan,
    _tile_program,
    _tile_rows,
    build_tile_plan,
    dot_fp32,
    padded_dim,
    qk_scale,
    tile_descriptor,
    tile_descriptors,
    tile_plan,
)
from .configs import LaunchConfig, default_config
from .dispatch import choose_impl
from .fwd_tile import _attn_fwd_tile, _normalise, _store_rows
from .layout import BlockLayout

__all__ = ["TilePlan", "build_tile_plan", "sparse_attention_fwd", "tile_descriptor",
           "tile_descriptors", "tile_plan"]

@triton.jit
def _sparse_attn_fwd(Q, K, V, KDesc, VDesc, Out, Lse,
                     RowPtr, NFull, KvBlock, RowBits,
                     stride_qz, stride_qh, stride_qm, stride_qk,
                     stride_kz, stride_kh, stride_kn, stride_kk,
                     stride_vz, stride_vh, stride_vn, stride_vk,
                     stride_oz, stride_oh, stride_om, stride_ok,
                     num_heads, q_per_kv, heads_per_pattern, seq_q, seq_k, tiles, first_tile,
                     qk_scale, q_start, k_start,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     RETURN_LSE: tl.constexpr, DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr):
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    tl.static_assert((BLOCK_SIZE % BLOCK_M == 0) or (BLOCK_M % BLOCK_SIZE == 0))
    # q_start and k_start are None for a whole sequence (compile-time constants, so that launch
    # compiles as if they were not there); for a partition, the absolute positions of the first
    # query and key, with seq_k one past the last key. Descriptors index keys from K's start.
    tl.static_assert((q_start is None) or not USE_TMA)
    tile, off_zh, off_z, off_h, off_kvh, row = _tile_program(first_tile, num_heads, q_per_kv,
                                                             heads_per_pattern, tiles)
    # Queries are the last seq_q of the seq_k positions, or a partition's from q_start; tiles
    # are aligned to absolute positions.
    q_offset = seq_k - seq_q if q_start is None else q_start
    offs_m_abs, offs_m, offs_d, row_ok, d_ok = _tile_rows(tile, q_offset, seq_q,
                                                          BLOCK_M, BLOCK_D, HEAD_DIM)
    q_base = Q + off_z * stride_qz + off_h.to(tl.int64) * stride_qh
    k_base = K + off_z * stride_kz + off_kvh * stride_kh
    v_base = V + off_z * stride_vz + off_kvh * stride_vh
    if k_start is not None:
        # The tile loop indexes keys by absolute position: a partition's K and V start at k_start.
        k_base -= k_start.to(tl.int64) * stride_kn
        v_base -= k_start.to(tl.int64) * stride_vn
    acc, m_i, l_i = _attn_fwd_tile(q_base, k_base, v_base, stride_qm, stride_qk,
                                   stride_kn, stride_kk, stride_vn, stride_vk,
                                   KDesc, VDesc, off_z.to(tl.int32), off_kvh.to(tl.int32),
                                   RowPtr, NFull, KvBlock, RowBits, row, tile,
                                   offs_m_abs, offs_m, offs_d, row_ok, d_ok, seq_k, qk_scale,
                                   BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, IS_CAUSAL,
                                   DOT_FP32, USE_TMA)

    # -- epilogue --
    out, l_safe = _normalise(acc, l_i)
    o_base = Out + off_z * stride_oz + off_h.to(tl.int64) * stride_oh
    _store_rows(out, o_base, offs_m, offs_d, row_ok, d_ok, stride_om, stride_ok)
    if RETURN_LSE:
        # Natural-log log-sum-exp; m_i is in log2 units.
        lse = (m_i + tl.math.log2(l_safe)) * LN2
        if q_start is not None:
            # A partition's row may see none of its keys: -inf weighs it out of a merge.
            lse = tl.where(l_i == 0.0, float("-inf"), lse)
        lse_ptrs = Lse + off_zh.to(tl.int64) * seq_q + offs_m
        tl.store(lse_ptrs, lse, mask=row_ok)


def sparse_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                         sm_scale: float, config: LaunchConfig, return_lse: bool = True,
                         out: torch.Tensor | None = None, tma: bool = True,
                         starts: tuple[int, int] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel on checked ``(batch, heads, seq, dim)`` views (any strides).

    The implementation is :func:`kernels.dispatch.choose_impl`'s choice for ``config.impl``:
    a Gluon config the call cannot take runs the Triton default instead. ``tma=False`` loads
    tiles through pointers even where tensor-memory copies could (to measure that path).
    Returns ``out`` (q's shape and dtype, a ``(batch, heads, seq_q, dim)`` view of a
    ``(batch, seq_q, heads, dim)`` tensor) and the natural-log LSE ``(batch, heads, seq_q)`` float32, or None.

    ``starts=(q_start, k_start)`` runs a partition: q holds the queries at absolute positions
    from ``q_start``, k and v the keys from ``k_start`` (a multiple of the block size); rows that
    see none of those keys come out zero with LSE -inf. Partitions run the Triton kernel on
    pointer loads (a Gluon config runs the Triton default).
    """
    partition = starts is not None
    choice = choose_impl("fwd", "triton" if partition else config.impl, q.device, q.dtype,
                         (q, k, v, layout), tma)
    if choice.impl == "gluon":
        boxes = config.block_n // fwd_ws.BOX_N
        if halves_plan.halves_pay(layout, k.shape[2], config.num_stages, boxes):
            return fwd_halves.sparse_attention_fwd_halves(q, k, v, layout, sm_scale, return_lse,
                                                          out, stages=config.num_stages,
                                                          boxes=boxes)
        return fwd_ws.sparse_attention_fwd_ws(q, k, v, layout, sm_scale, return_lse, out,
                                              stages=config.num_stages, boxes=boxes)
    if config.impl != choice.impl:
        config = default_config("fwd", q.device, layout.block_size, q.shape[3], q.dtype,
                                allow_gluon=False)
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    q_start, k_start = starts if partition else (seq_k - seq_q, 0)
    k_end = k_start + seq_k
    plan = tile_plan(layout, config.block_m, k_end, q_start + seq_q, k_start)
    if out is None:
        # (batch, seq, heads, dim) memory order, the common layout, whatever q's strides are.
        out = buffers.new_output((batch, seq_q, heads, head_dim), q, q.dtype).transpose(1, 2)
    lse = buffers.new_output((batch, heads, seq_q) if return_lse else (1,), q, torch.float32)
    first_tile = q_start // config.block_m
    grid = (plan.tiles - first_tile, batch * heads)
    block_d = padded_dim(head_dim)
    descs = tile_descriptors(config.block_n, block_d, k, v, tma=tma and not partition)
    _sparse_attn_fwd[grid](
        q, k, v, *(descs or (k, v)), out, lse,
        plan.row_ptr, plan.n_full, plan.kv_block, plan.row_bits,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, heads // kv_heads, heads // layout.heads, seq_q, k_end, plan.tiles, first_tile,
        qk_scale(sm_scale), *(starts if partition else (None, None)),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_D=block_d, HEAD_DIM=head_dim,
        BLOCK_SIZE=layout.block_size, IS_CAUSAL=layout.causal, RETURN_LSE=return_lse,
        DOT_FP32=dot_fp32(q.dtype), USE_TMA=descs is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, (lse if return_lse else None)
