"""Backward block-sparse attention: the dq kernel, the dk/dv kernel, and the launcher.

- ``_bwd_dq``: one program per (query tile, batch, head) over the forward's tile plan. It runs
  first and also writes ``delta = rowsum(dO * O)`` for its rows, which it needs itself and the
  dk/dv kernel reads (no separate pass over O and dO).
- ``_bwd_dkdv``: one program per (kv tile, batch, kv head); it walks, for each query head of its
  GQA group, the query blocks that keep its kv block (the pattern's column form), so dk/dv are
  summed over the group without atomics. Compiled with ``ATOMIC_DQ`` it is the fused backward
  (:mod:`kernels.bwd_fused`, impl "fused"): it also adds each step's dS K into an fp32 dq
  buffer with atomics, so no dq kernel recomputes the scores (5 matrix products per pair, not 7).

On Hopper each has a warp-specialised Gluon form (:mod:`kernels.bwd_dq_ws`,
:mod:`kernels.bwd_dkdv_ws`; configs with ``impl="gluon"``, the defaults there), which
:func:`launch_dq` and :func:`launch_dkdv` run where the call allows.

Each kernel has its own ``LaunchConfig`` (kernel names "dq" and "bwd"): ``block_m`` is the outer
tile (query rows for dq, kv rows for dk/dv) and ``block_n`` the inner one (kv rows for dq, query
rows for dk/dv). Their best tiles differ: on the H100, dq ran fastest with 32-key steps or
128-row tiles at 8 warps, dk/dv with 64x64 tiles at 4 warps (kernels/PERF.md, session 6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers, bwd_dkdv_ws, bwd_dq_halves, bwd_dq_ws, halves_plan
from .common import (
    LOG2E,
    _kv_step,
    _plan_row,
    _score_mask,
    _tile_program,
    _tile_rows,
    dot_fp32,
    padded_dim,
    qk_scale,
    tile_descriptors,
    tile_plan,
)
from .columns import column_plan
from .configs import LaunchConfig, default_config
from .dispatch import choose_impl
from .layout import BlockLayout


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                stride_qm, stride_qk, stride_dom, stride_dok, stride_dqm, stride_dqk,
                q_desc, do_desc, desc_z, desc_h,
                QBlock, entry_start, entry_end,
                offs_n, q_offset, seq_q, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_M
    # One flat loop over (entry, query sub-tile) so the loads pipeline across kept blocks; in
    # masked entries, rows before the first query or above the diagonal are masked out below.
    for t in range(entry_start * N_SUB, entry_end * N_SUB):
        start_m_abs = tl.load(QBlock + t // N_SUB) * BLOCK_SIZE + (t % N_SUB) * BLOCK_M
        offs_m_abs = start_m_abs + tl.arange(0, BLOCK_M)
        offs_m = offs_m_abs - q_offset
        if MASKED:
            m_ok = (offs_m >= 0) & (offs_m < seq_q)
        # -- load q, dO and the row statistics --
        if USE_TMA:
            # Rows outside [0, seq_q) come back as zeros (the coordinate may be negative).
            start_m = start_m_abs - q_offset
            q = tl.reshape(q_desc.load([desc_z, desc_h, start_m, 0]), [BLOCK_M, BLOCK_D])
            do = tl.reshape(do_desc.load([desc_z, desc_h, start_m, 0]), [BLOCK_M, BLOCK_D])
        else:
            q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk
            do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dok
            if MASKED:
                q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            else:
                q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # -- recompute P^T from the forward's log-sum-exp (log2 units) --
        qkt = tl.dot(k, tl.trans(q))
        pt = tl.math.exp2(qkt * qk_scale - lse[None, :] * LOG2E)
        if MASKED:
            keep = m_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (offs_m_abs[None, :] >= offs_n[:, None])
            pt = tl.where(keep, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        # -- dS^T = P^T * (dP^T - delta) --
        dpt = tl.dot(v, tl.trans(do))
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk)
        if ATOMIC_DQ:
            # -- dQ += dS K: the kv tiles of every kept block add into the same query rows, so
            # they meet in the fp32 buffer (relaxed: nothing reads it before the kernel ends) --
            dq = tl.dot(tl.trans(dst), k)
            dq_ptrs = dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqk
            if MASKED:
                tl.atomic_add(dq_ptrs, dq, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, QDesc, DODesc, DK, DV, DQ, Lse, Delta,
              ColPtr, NFull, QBlock,
              stride_qz, stride_qh, stride_qm, stride_qk,
              stride_kz, stride_kh, stride_kn, stride_kk,
              stride_vz, stride_vh, stride_vn, stride_vk,
              stride_doz, stride_doh, stride_dom, stride_dok,
              stride_dkz, stride_dkh, stride_dkn, stride_dkk,
              stride_dvz, stride_dvh, stride_dvn, stride_dvk,
              stride_dqz, stride_dqh, stride_dqm, stride_dqk,
              num_heads, kv_heads, q_per_kv, heads_per_pattern, seq_q, seq_k, kv_blocks,
              qk_scale, sm_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_CAUSAL: tl.constexpr,
              DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    tl.static_assert(BLOCK_SIZE % BLOCK_M == 0)
    # DQ (fp32, unscaled dS K) and its strides are given exactly when ATOMIC_DQ; otherwise they
    # are None, compile-time constants, and this compiles as the dk/dv kernel alone.
    tl.static_assert(ATOMIC_DQ == (DQ is not None))
    kv_tile_start = tl.program_id(0) * BLOCK_N
    off_zkv = tl.program_id(1)
    off_z = (off_zkv // kv_heads).to(tl.int64)
    off_kvh = (off_zkv % kv_heads).to(tl.int64)
    kv_block = kv_tile_start // BLOCK_SIZE
    q_offset = seq_k - seq_q
    offs_n = kv_tile_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seq_k
    kv_mask = n_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    k = tl.load(K + off_z * stride_kz + off_kvh * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kk, mask=kv_mask, other=0.0)
    v = tl.load(V + off_z * stride_vz + off_kvh * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vk, mask=kv_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # dk/dv of a kv head sum over the query heads of its group.
    for g in range(0, q_per_kv):
        off_h = off_kvh * q_per_kv + g
        off_zh = off_z * num_heads + off_h
        row = (off_h // heads_per_pattern) * kv_blocks + kv_block
        q_base = Q + off_z * stride_qz + off_h * stride_qh
        do_base = DO + off_z * stride_doz + off_h * stride_doh
        lse_base = Lse + off_zh * seq_q
        delta_base = Delta + off_zh * seq_q
        dq_base = DQ
        if ATOMIC_DQ:
            dq_base = DQ + off_z * stride_dqz + off_h * stride_dqh
        entry_start = tl.load(ColPtr + row)
        entry_mid = entry_start + tl.load(NFull + row)
        entry_end = tl.load(ColPtr + row + 1)
        # The entries that need no mask, then those that do: the loop is compiled once for each.
        for masked in tl.static_range(2):
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                 stride_qm, stride_qk, stride_dom, stride_dok,
                                 stride_dqm, stride_dqk,
                                 QDesc, DODesc, off_z.to(tl.int32), off_h.to(tl.int32), QBlock,
                                 entry_mid if masked else entry_start,
                                 entry_end if masked else entry_mid,
                                 offs_n, q_offset, seq_q, qk_scale,
                                 BLOCK_M, BLOCK_D, HEAD_DIM, BLOCK_SIZE, masked == 1, IS_CAUSAL,
                                 DOT_FP32, USE_TMA, ATOMIC_DQ)

    # -- epilogue: dS was taken w.r.t. the scaled scores --
    dk = dk * sm_scale
    tl.store(DK + off_z * stride_dkz + off_kvh * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkk, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_z * stride_dvz + off_kvh * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvk, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base,
              stride_kn, stride_kk, stride_vn, stride_vk,
              KvBlock, RowBits, entry_start, entry_end,
              offs_m_abs, tile_first_block, row_end, seq_k, qk_scale,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_SIZE: tl.constexpr, SUB_BLOCKS: tl.constexpr, MASKED: tl.constexpr,
              IS_CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    # One flat loop over (entry, kv sub-tile), as in the forward.
    for t in range(entry_start * N_SUB, entry_end * N_SUB):
        e, _, offs_n, n_ok = _kv_step(KvBlock, t, seq_k, row_end, BLOCK_SIZE, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk
        if MASKED:
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # -- recompute P, then dS = P * (dP - delta) --
        qk = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            keep = _score_mask(n_ok, offs_n, offs_m_abs, RowBits, e, tile_first_block,
                               BLOCK_SIZE, SUB_BLOCKS, IS_CAUSAL)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _row_delta(Out, DO, Delta, off_z, off_h64, off_zh, offs_m, offs_d, mask, row_ok, seq_q,
               stride_oz, stride_oh, stride_om, stride_ok,
               stride_doz, stride_doh, stride_dom, stride_dok):
    """A query tile's dO, and its rows' ``delta = rowsum(dO * O)`` (fp32), written to Delta:
    the rows belong to the calling program alone. The dq kernel writes delta on its way; the
    fused backward's pre-pass (:mod:`kernels.bwd_fused`) before its one kernel."""
    do = tl.load(DO + off_z * stride_doz + off_h64 * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dok, mask=mask, other=0.0)
    o = tl.load(Out + off_z * stride_oz + off_h64 * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_ok, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + off_zh.to(tl.int64) * seq_q + offs_m, delta, mask=row_ok)
    return do, delta


@triton.jit
def _bwd_dq(Q, K, V, Out, DO, DQ, Lse, Delta,
            RowPtr, NFull, KvBlock, RowBits,
            stride_qz, stride_qh, stride_qm, stride_qk,
            stride_kz, stride_kh, stride_kn, stride_kk,
            stride_vz, stride_vh, stride_vn, stride_vk,
            stride_oz, stride_oh, stride_om, stride_ok,
            stride_doz, stride_doh, stride_dom, stride_dok,
            stride_dqz, stride_dqh, stride_dqm, stride_dqk,
            num_heads, q_per_kv, heads_per_pattern, seq_q, seq_k, tiles, first_tile,
            qk_scale, sm_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_CAUSAL: tl.constexpr,
            DOT_FP32: tl.constexpr):
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    SUB_BLOCKS: tl.constexpr = BLOCK_M // BLOCK_SIZE if BLOCK_M > BLOCK_SIZE else 1
    tile, off_zh, off_z, off_h, off_kvh, row = _tile_program(first_tile, num_heads, q_per_kv,
                                                             heads_per_pattern, tiles)
    offs_m_abs, offs_m, offs_d, row_ok, d_ok = _tile_rows(tile, seq_k - seq_q, seq_q,
                                                          BLOCK_M, BLOCK_D, HEAD_DIM)
    mask = row_ok[:, None] & d_ok[None, :]

    off_h64 = off_h.to(tl.int64)
    q = tl.load(Q + off_z * stride_qz + off_h64 * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qk, mask=mask, other=0.0)
    do, delta = _row_delta(Out, DO, Delta, off_z, off_h64, off_zh, offs_m, offs_d, mask, row_ok,
                           seq_q, stride_oz, stride_oh, stride_om, stride_ok,
                           stride_doz, stride_doh, stride_dom, stride_dok)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + off_zh.to(tl.int64) * seq_q + offs_m, mask=row_ok, other=0.0)
    lse = lse * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + off_z * stride_kz + off_kvh * stride_kh
    v_base = V + off_z * stride_vz + off_kvh * stride_vh
    entry_start, entry_mid, entry_end, tile_first_block, row_end = _plan_row(
        RowPtr, NFull, row, tile, seq_k, BLOCK_M, BLOCK_SIZE, IS_CAUSAL)
    # The entries that need no mask, then those that do: the loop is compiled once for each.
    for masked in tl.static_range(2):
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kk, stride_vn,
                       stride_vk, KvBlock, RowBits, entry_mid if masked else entry_start,
                       entry_end if masked else entry_mid, offs_m_abs, tile_first_block,
                       row_end, seq_k, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE,
                       SUB_BLOCKS, masked == 1, IS_CAUSAL, DOT_FP32)
    dq = dq * sm_scale
    tl.store(DQ + off_z * stride_dqz + off_h64 * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqk, dq.to(DQ.dtype.element_ty), mask=mask)


def grad_like(t: torch.Tensor) -> torch.Tensor:
    """A gradient buffer in (batch, seq, heads, dim) memory order, viewed as (b, h, s, d)."""
    b, h, s, d = t.shape
    return buffers.new_output((b, s, h, d), t, t.dtype).transpose(1, 2)


def kernel_constants(q: torch.Tensor, layout: BlockLayout) -> dict:
    """The constexprs every backward kernel takes from the call: tile width over the head dim,
    the head dim, the sparse block, causality, and whether dots run in fp32."""
    return dict(BLOCK_D=padded_dim(q.shape[3]), HEAD_DIM=q.shape[3], BLOCK_SIZE=layout.block_size,
                IS_CAUSAL=layout.causal, DOT_FP32=dot_fp32(q.dtype))


def sparse_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, layout: BlockLayout, sm_scale: float,
                         config: LaunchConfig, dq_config: LaunchConfig, tma: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients dq, dk, dv for ``(batch, heads, seq, dim)`` views (any strides); ``config``
    launches the dk/dv kernel (:func:`launch_dkdv`), ``dq_config`` the dq kernel
    (:func:`launch_dq`). ``tma=False`` loads every tile through pointers even where
    tensor-memory copies could (so the Triton kernels run)."""
    batch, heads, seq_q, _ = q.shape
    dq, dk, dv = grad_like(q), grad_like(k), grad_like(v)
    delta = buffers.new_output((batch, heads, seq_q), q, torch.float32)
    # -- dq first: it writes delta, which the dk/dv kernel reads --
    launch_dq(do, q, k, v, out, lse, delta, dq, layout, sm_scale, dq_config, tma)
    launch_dkdv(do, q, k, v, lse, delta, dk, dv, layout, sm_scale, config, tma)
    return dq, dk, dv


def launch_dq(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor,
              layout: BlockLayout, sm_scale: float, config: LaunchConfig, tma: bool = True) -> None:
    """Launch the dq kernel with ``config`` into ``dq``, writing ``delta = rowsum(dO * O)``: a
    Gluon config runs :mod:`kernels.bwd_dq_ws` where the call can take it (on owned steps,
    :mod:`kernels.bwd_dq_halves`, where the pattern's tile halves keep different blocks enough
    for that to pay), else the Triton default."""
    choice = choose_impl("dq", config.impl, q.device, q.dtype, (q, k, v, layout, do), tma)
    if choice.impl == "gluon":
        boxes = config.block_n // bwd_dq_ws.BOX_N
        launch = (bwd_dq_halves.sparse_attention_dq_halves
                  if halves_plan.halves_pay(layout, k.shape[2], config.num_stages, boxes)
                  else bwd_dq_ws.sparse_attention_dq_ws)
        launch(do, q, k, v, out, lse, delta, dq, layout, sm_scale, stages=config.num_stages,
               boxes=boxes)
        return
    if config.impl != choice.impl:
        config = default_config("dq", q.device, layout.block_size, q.shape[3], q.dtype,
                                allow_gluon=False)
    batch, heads, seq_q, _ = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    plan = tile_plan(layout, config.block_m, seq_k)
    first_tile = (seq_k - seq_q) // config.block_m
    _bwd_dq[(plan.tiles - first_tile, batch * heads)](
        q, k, v, out, do, dq, lse, delta, plan.row_ptr, plan.n_full, plan.kv_block, plan.row_bits,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(), *dq.stride(),
        heads, heads // kv_heads, heads // layout.heads, seq_q, seq_k, plan.tiles, first_tile,
        qk_scale(sm_scale), sm_scale, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **kernel_constants(q, layout))


def launch_dkdv(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                lse: torch.Tensor, delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                layout: BlockLayout, sm_scale: float, config: LaunchConfig, tma: bool = True,
                dq_acc: torch.Tensor | None = None) -> None:
    """Launch the dk/dv kernel with ``config`` into ``dk`` and ``dv``, reading ``delta``: a
    Gluon config runs :mod:`kernels.bwd_dkdv_ws` where the call can take it, else the Triton
    default.

    With ``dq_acc`` (float32, q's shape, zeroed) it runs as the fused backward: each step's
    dS K (not yet multiplied by ``sm_scale``) is added into ``dq_acc`` with atomics.
    """
    batch, heads, seq_q, _ = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    cols = column_plan(layout, seq_q, seq_k)
    if dq_acc is None and config.impl == "gluon":
        choice = choose_impl("bwd", "gluon", q.device, q.dtype, (q, k, v, layout, do), tma)
        if choice.impl == "gluon":
            bwd_dkdv_ws.sparse_attention_dkdv_ws(do, q, k, v, lse, delta, dk, dv, layout, cols,
                                                 sm_scale, stages=config.num_stages)
            return
        config = default_config("bwd", q.device, layout.block_size, q.shape[3], q.dtype,
                                allow_gluon=False)
    constants = kernel_constants(q, layout)
    # The dk/dv kernel reads q and dO tiles of block_n rows through descriptors where it can.
    # The dq kernel keeps pointer loads: descriptors for its k/v tiles measured no faster.
    q_descs = tile_descriptors(config.block_n, constants["BLOCK_D"], q, do, tma=tma)
    dq_strides = dq_acc.stride() if dq_acc is not None else (None,) * 4
    _bwd_dkdv[(triton.cdiv(seq_k, config.block_m), batch * kv_heads)](
        q, k, v, do, *(q_descs or (q, do)), dk, dv, dq_acc, lse, delta,
        cols.col_ptr, cols.n_full, cols.q_block,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *dq_strides,
        heads, kv_heads, heads // kv_heads, heads // layout.heads, seq_q, seq_k, cols.kv_blocks,
        qk_scale(sm_scale), sm_scale, BLOCK_M=config.block_n, BLOCK_N=config.block_m,
        USE_TMA=q_descs is not None, ATOMIC_DQ=dq_acc is not None, num_warps=config.num_warps,
        num_stages=config.num_stages, **constants)
