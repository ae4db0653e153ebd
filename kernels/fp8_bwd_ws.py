"""Warp-specialised fp8 dk/dv kernel for Hopper, written in Gluon: the fp8 backward's "gluon" form.

:mod:`kernels.bwd_dkdv_ws`'s kernel (two pipelines a program, each a loader warp and a consumer
warp group; persistent over the balanced deal of (kv tile, batch x kv head) items; a step's dk
product issued by the next step) with two of its four products in e4m3:

- ``sᵀ = k qᵀ`` and ``dk += dsᵀ q`` in bfloat16, on bf16 copies of the dequantised q and k
  (:func:`kernels.fp8_bwd.dequantised_bf16`): dS cancels, and e4m3 would lose it;
- ``dpᵀ = v dOᵀ`` and ``dv += pᵀ dO`` in e4m3: v as stored (in k's layout), dO quantised with one
  descale per (batch, kv group), so that each item's dv has one scale.

``pᵀ dO`` takes pᵀ from where the ``sᵀ`` accumulator leaves it, as the fp8 forward's ``p v``
does (:func:`kernels.fp8_ws._as_pv_operand`): dOᵀ comes with its query axis reordered within each
run of 32 (the pre-pass writes it so), which needs query tiles at multiples of 32 from the first
query (``seq_k - seq_q`` a multiple of 32). p is scaled by ``2**P_SHIFT`` (the LSE is shifted) and
dv and dS take the factor back out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers, bwd, select
from .bwd_dkdv_ws import KV_TILE, Q_TILE, _stat_descriptor, dkdv_items, row_statistics
from .columns import ColumnPlan, column_plan
from .common import LOG2E, qk_scale
from .fp8_bwd import dequantised_inputs, quantised_do
from .fp8_softmax import P_SHIFT
from .fwd_ws import GLUON, MAX_REGS, _sm_count
from .layout import BlockLayout

if GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from .bwd_dkdv_ws import _item
    from .fp8_ws import _as_pv_operand, _descriptor, _to_e4m3
    from .fwd_ws import _reinterpret, _tma_load

KV_ROWS = tl.constexpr(KV_TILE)
Q_ROWS = tl.constexpr(Q_TILE)
P_UNSCALE = tl.constexpr(2.0 ** -P_SHIFT.value)


if GLUON:
    @gluon.jit
    def _load_partition(q_desc, do_desc, dot_desc, k_desc, v_desc, lse_desc, delta_desc, q_bufs,
                        do_bufs, dot_bufs, lse_bufs, delta_bufs, k_smem, v_smem, ready, empty,
                        kv_ready, kv_empty, Items, Starts, ColPtr, QBlock, n_kv_tiles, num_heads,
                        kv_heads, q_per_kv, heads_per_pattern, kv_blocks, stat_stride, q_offset,
                        BLOCK_SIZE: gl.constexpr, PIPE: gl.constexpr):
        """Loader warp of pipeline ``PIPE``: each item's k (bf16) and v (e4m3), then per step
        the q (bf16), dO and dOᵀ (e4m3) tiles with their rows' lse and delta."""
        stages: gl.constexpr = ready.shape[0]
        N_SUB: gl.constexpr = BLOCK_SIZE // Q_ROWS
        KV_N_SUB: gl.constexpr = BLOCK_SIZE // KV_ROWS
        prog = 2 * gl.program_id(0) + PIPE
        g = 0
        i = 0
        for slot in range(gl.load(Starts + prog), gl.load(Starts + prog + 1)):
            kv_tile, off_z, off_kvh = _item(gl.load(Items + slot), n_kv_tiles, kv_heads)
            mbarrier.wait(kv_empty, (i & 1) ^ 1)
            mbarrier.expect(kv_ready, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [off_z, off_kvh, kv_tile * KV_ROWS, 0], kv_ready, k_smem)
            _tma_load(v_desc, [off_z, off_kvh, kv_tile * KV_ROWS, 0], kv_ready, v_smem)
            kv_block = kv_tile // KV_N_SUB
            for gq in range(0, q_per_kv):
                off_h = off_kvh * q_per_kv + gq
                row = (off_h // heads_per_pattern) * kv_blocks + kv_block
                stat = (off_z * num_heads + off_h) * stat_stride + q_offset
                for t in range(gl.load(ColPtr + row) * N_SUB, gl.load(ColPtr + row + 1) * N_SUB):
                    start_m = (gl.load(QBlock + t // N_SUB) * BLOCK_SIZE + (t % N_SUB) * Q_ROWS
                               - q_offset)
                    s = g % stages
                    mbarrier.wait(empty.index(s), ((g // stages) & 1) ^ 1)
                    mbarrier.expect(ready.index(s), q_desc.block_type.nbytes
                                    + do_desc.block_type.nbytes + dot_desc.block_type.nbytes
                                    + 2 * lse_desc.block_type.nbytes)
                    _tma_load(q_desc, [off_z, off_h, start_m, 0], ready.index(s), q_bufs.index(s))
                    _tma_load(do_desc, [off_z, off_h, start_m, 0], ready.index(s),
                              do_bufs.index(s))
                    _tma_load(dot_desc, [off_z, off_h, 0, start_m], ready.index(s),
                              dot_bufs.index(s))
                    _tma_load(lse_desc, [stat + start_m], ready.index(s), lse_bufs.index(s))
                    _tma_load(delta_desc, [stat + start_m], ready.index(s), delta_bufs.index(s))
                    g += 1
            i += 1

    @gluon.jit
    def _step(dk, dv, ds_prev, k_op, v_op, q_bufs, do_bufs, dot_bufs, lse_bufs, delta_bufs,
              ready, empty, g, g0, t, MASKED: gl.constexpr, QBlock, offs_n, q_offset, seq_q,
              qk_scale, dp_scale, BLOCK_SIZE: gl.constexpr, IS_CAUSAL: gl.constexpr,
              s_layout: gl.constexpr, s8_layout: gl.constexpr, op_layout: gl.constexpr,
              p_layout: gl.constexpr):
        """One step (see :func:`kernels.bwd_dkdv_ws._dkdv_step`): sᵀ and dk's product of the
        last step in bf16, dpᵀ and dv's in e4m3."""
        stages: gl.constexpr = ready.shape[0]
        N_SUB: gl.constexpr = BLOCK_SIZE // Q_ROWS
        s = g % stages
        zero = gl.zeros([KV_ROWS, Q_ROWS], gl.float32, s_layout)
        zero8 = gl.zeros([KV_ROWS, Q_ROWS], gl.float32, s8_layout)
        mbarrier.wait(ready.index(s), (g // stages) & 1)
        q_tile = q_bufs.index(s)
        prev = (g - (g > g0).to(gl.int32)) % stages
        dk = warpgroup_mma(ds_prev, q_bufs.index(prev), dk, is_async=True)
        st = warpgroup_mma(k_op, q_tile.permute((1, 0)), zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_op, do_bufs.index(s).permute((1, 0)), zero8, use_acc=False,
                            is_async=True)
        rows: gl.constexpr = gl.SliceLayout(0, s_layout)
        st, dk = warpgroup_mma_wait(1, deps=(st, dk))
        if g > g0:
            mbarrier.arrive(empty.index(prev), count=1)
        lse = lse_bufs.index(s).load(rows)  # log2 units, less P_SHIFT: p in [0, 256]
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        if MASKED:
            start_m_abs = gl.load(QBlock + t // N_SUB) * BLOCK_SIZE + (t % N_SUB) * Q_ROWS
            offs_m_abs = start_m_abs + gl.arange(0, Q_ROWS, layout=rows)
            offs_m = offs_m_abs - q_offset
            keep = gl.expand_dims((offs_m >= 0) & (offs_m < seq_q), 0)
            if IS_CAUSAL:
                keep = keep & (gl.expand_dims(offs_m_abs, 0) >= gl.expand_dims(offs_n, 1))
            pt = gl.where(keep, pt, 0.0)
        p8 = _to_e4m3(_as_pv_operand(pt, p_layout))
        dv = warpgroup_mma(p8, dot_bufs.index(s).permute((1, 0)), dv, is_async=True)
        dpt = warpgroup_mma_wait(1, deps=(dpt,))
        dpt = gl.convert_layout(dpt, s_layout, assert_trivial=True)
        delta = delta_bufs.index(s).load(rows)
        dst = pt * (dpt * dp_scale - gl.expand_dims(delta, 0)) * P_UNSCALE
        ds_op = gl.convert_layout(dst.to(q_tile.dtype), op_layout)
        dv = warpgroup_mma_wait(0, deps=(dv,))
        return dk, dv, ds_op

    @gluon.jit
    def _consumer(q_bufs, do_bufs, dot_bufs, lse_bufs, delta_bufs, k_smem, v_smem, ready, empty,
                  kv_ready, kv_empty, Items, Starts, ColPtr, NFull, QBlock, DK, DV, DoDescale,
                  VDescale, stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                  stride_dvz, stride_dvh, stride_dvn, stride_dvk, stride_vdz, stride_vdh,
                  n_kv_tiles, kv_heads, q_per_kv, heads_per_pattern, kv_blocks,
                  seq_q, seq_k, qk_scale, sm_scale,
                  HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                  PIPE: gl.constexpr):
        """Consumer warp group of pipeline ``PIPE``: dk and dv of each of its items."""
        NUM_WARPS: gl.constexpr = 4
        N_SUB: gl.constexpr = BLOCK_SIZE // Q_ROWS
        KV_N_SUB: gl.constexpr = BLOCK_SIZE // KV_ROWS
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, Q_ROWS, 16])
        s8_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, Q_ROWS, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
        o8_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 32])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o8_layout, k_width=4)
        q_offset = seq_k - seq_q
        prog = 2 * gl.program_id(0) + PIPE
        g = 0
        i = 0
        for slot in range(gl.load(Starts + prog), gl.load(Starts + prog + 1)):
            kv_tile, off_z, off_kvh = _item(gl.load(Items + slot), n_kv_tiles, kv_heads)
            kv_block = kv_tile // KV_N_SUB
            offs_n = kv_tile * KV_ROWS + gl.arange(0, KV_ROWS, layout=gl.SliceLayout(1, s_layout))
            # One dO descale per (batch, kv group), so one scale for the item's dv.
            do_descale = gl.load(DoDescale + off_z * kv_heads + off_kvh)
            dp_scale = do_descale * gl.load(VDescale + off_z * stride_vdz + off_kvh * stride_vdh)
            dk = gl.zeros([KV_ROWS, HEAD_DIM], gl.float32, o_layout)
            dv = gl.zeros([KV_ROWS, HEAD_DIM], gl.float32, o8_layout)
            ds = gl.zeros([KV_ROWS, Q_ROWS], DK.dtype.element_ty, op_layout)
            mbarrier.wait(kv_ready, i & 1)
            g0 = g
            for gq in range(0, q_per_kv):
                off_h = off_kvh * q_per_kv + gq
                row = (off_h // heads_per_pattern) * kv_blocks + kv_block
                start = gl.load(ColPtr + row)
                mid = start + gl.load(NFull + row)
                end = gl.load(ColPtr + row + 1)
                for t in range(start * N_SUB, mid * N_SUB):
                    dk, dv, ds = _step(dk, dv, ds, k_smem, v_smem, q_bufs, do_bufs, dot_bufs,
                                       lse_bufs, delta_bufs, ready, empty, g, g0, t, False,
                                       QBlock, offs_n, q_offset, seq_q, qk_scale, dp_scale,
                                       BLOCK_SIZE, IS_CAUSAL, s_layout, s8_layout, op_layout,
                                       p_layout)
                    g += 1
                for t in range(mid * N_SUB, end * N_SUB):
                    dk, dv, ds = _step(dk, dv, ds, k_smem, v_smem, q_bufs, do_bufs, dot_bufs,
                                       lse_bufs, delta_bufs, ready, empty, g, g0, t, True,
                                       QBlock, offs_n, q_offset, seq_q, qk_scale, dp_scale,
                                       BLOCK_SIZE, IS_CAUSAL, s_layout, s8_layout, op_layout,
                                       p_layout)
                    g += 1
            if g > g0:
                last = (g - 1) % ready.shape[0]
                dk = warpgroup_mma(ds, q_bufs.index(last), dk, is_async=True)
                dk = warpgroup_mma_wait(0, deps=(dk,))
                mbarrier.arrive(empty.index(last), count=1)
            mbarrier.arrive(kv_empty, count=1)

            # -- epilogue: dS was taken w.r.t. the scaled scores; dv carries 2**P_SHIFT / dO's
            # descale --
            offs_n_o = kv_tile * KV_ROWS + gl.arange(0, KV_ROWS,
                                                     layout=gl.SliceLayout(1, o_layout))
            offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            n_ok = gl.expand_dims(offs_n_o < seq_k, 1)
            rows = gl.expand_dims(offs_n_o.to(gl.int64), 1)
            dk_ptrs = (DK + off_z.to(gl.int64) * stride_dkz + off_kvh.to(gl.int64) * stride_dkh
                       + rows * stride_dkn + gl.expand_dims(offs_d * stride_dkk, 0))
            gl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok)
            dv = gl.convert_layout(dv * (do_descale * P_UNSCALE), o_layout)
            dv_ptrs = (DV + off_z.to(gl.int64) * stride_dvz + off_kvh.to(gl.int64) * stride_dvh
                       + rows * stride_dvn + gl.expand_dims(offs_d * stride_dvk, 0))
            gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok)
            i += 1

    @gluon.jit
    def _fp8_bwd_dkdv_ws(q_desc, do_desc, dot_desc, k_desc, v_desc, lse_desc, delta_desc, DK,
                         DV, DoDescale, VDescale, Items, Starts, ColPtr, NFull, QBlock,
                         stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                         stride_dvz, stride_dvh, stride_dvn, stride_dvk, stride_vdz, stride_vdh,
                         n_kv_tiles, num_heads, kv_heads, q_per_kv, heads_per_pattern,
                         kv_blocks, seq_q, seq_k, stat_stride, qk_scale, sm_scale,
                         HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                         IS_CAUSAL: gl.constexpr, STAGES: gl.constexpr):
        """Persistent, two pipelines a program (as :mod:`kernels.bwd_dkdv_ws`)."""
        tile16: gl.constexpr = [Q_ROWS, HEAD_DIM]
        q16_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(tile16, gl.bfloat16)
        q8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(tile16, gl.float8e4nv)
        dot_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64,
                                                        element_bitwidth=8, rank=2)
        stat_layout: gl.constexpr = lse_desc.layout
        q0 = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 1, 1, Q_ROWS, HEAD_DIM],
                                       q_desc.layout)
        q1 = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 1, 1, Q_ROWS, HEAD_DIM],
                                       q_desc.layout)
        do0 = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, 1, 1, Q_ROWS, HEAD_DIM],
                                        do_desc.layout)
        do1 = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, 1, 1, Q_ROWS, HEAD_DIM],
                                        do_desc.layout)
        dot0 = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, 1, 1, HEAD_DIM, Q_ROWS],
                                         dot_desc.layout)
        dot1 = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, 1, 1, HEAD_DIM, Q_ROWS],
                                         dot_desc.layout)
        k0 = gl.allocate_shared_memory(gl.bfloat16, [1, 1, KV_ROWS, HEAD_DIM], k_desc.layout)
        k1 = gl.allocate_shared_memory(gl.bfloat16, [1, 1, KV_ROWS, HEAD_DIM], k_desc.layout)
        v0 = gl.allocate_shared_memory(gl.float8e4nv, [1, 1, KV_ROWS, HEAD_DIM], v_desc.layout)
        v1 = gl.allocate_shared_memory(gl.float8e4nv, [1, 1, KV_ROWS, HEAD_DIM], v_desc.layout)
        lse0 = gl.allocate_shared_memory(gl.float32, [STAGES, Q_ROWS], stat_layout)
        lse1 = gl.allocate_shared_memory(gl.float32, [STAGES, Q_ROWS], stat_layout)
        delta0 = gl.allocate_shared_memory(gl.float32, [STAGES, Q_ROWS], stat_layout)
        delta1 = gl.allocate_shared_memory(gl.float32, [STAGES, Q_ROWS], stat_layout)
        ready0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ready1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_ready0 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_ready1 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_empty0 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_empty1 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(ready0.index(st), count=1)
            mbarrier.init(ready1.index(st), count=1)
            mbarrier.init(empty0.index(st), count=1)
            mbarrier.init(empty1.index(st), count=1)
        mbarrier.init(kv_ready0, count=1)
        mbarrier.init(kv_ready1, count=1)
        mbarrier.init(kv_empty0, count=1)
        mbarrier.init(kv_empty1, count=1)
        q_t0 = _reinterpret(q0, gl.bfloat16, [STAGES, Q_ROWS, HEAD_DIM], q16_layout)
        q_t1 = _reinterpret(q1, gl.bfloat16, [STAGES, Q_ROWS, HEAD_DIM], q16_layout)
        do_t0 = _reinterpret(do0, gl.float8e4nv, [STAGES, Q_ROWS, HEAD_DIM], q8_layout)
        do_t1 = _reinterpret(do1, gl.float8e4nv, [STAGES, Q_ROWS, HEAD_DIM], q8_layout)
        dot_t0 = _reinterpret(dot0, gl.float8e4nv, [STAGES, HEAD_DIM, Q_ROWS], dot_layout)
        dot_t1 = _reinterpret(dot1, gl.float8e4nv, [STAGES, HEAD_DIM, Q_ROWS], dot_layout)
        k_t0 = k0.reshape([KV_ROWS, HEAD_DIM])
        k_t1 = k1.reshape([KV_ROWS, HEAD_DIM])
        v_t0 = v0.reshape([KV_ROWS, HEAD_DIM])
        v_t1 = v1.reshape([KV_ROWS, HEAD_DIM])
        gl.warp_specialize([
            (_consumer, (q_t0, do_t0, dot_t0, lse0, delta0, k_t0, v_t0, ready0, empty0,
                         kv_ready0, kv_empty0, Items, Starts, ColPtr, NFull, QBlock, DK, DV,
                         DoDescale, VDescale, stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                         stride_dvz, stride_dvh, stride_dvn, stride_dvk, stride_vdz, stride_vdh,
                         n_kv_tiles, kv_heads, q_per_kv, heads_per_pattern, kv_blocks, seq_q,
                         seq_k, qk_scale, sm_scale, HEAD_DIM, BLOCK_SIZE, IS_CAUSAL, 0)),
            (_consumer, (q_t1, do_t1, dot_t1, lse1, delta1, k_t1, v_t1, ready1, empty1,
                         kv_ready1, kv_empty1, Items, Starts, ColPtr, NFull, QBlock, DK, DV,
                         DoDescale, VDescale, stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                         stride_dvz, stride_dvh, stride_dvn, stride_dvk, stride_vdz, stride_vdh,
                         n_kv_tiles, kv_heads, q_per_kv, heads_per_pattern, kv_blocks, seq_q,
                         seq_k, qk_scale, sm_scale, HEAD_DIM, BLOCK_SIZE, IS_CAUSAL, 1)),
            (_load_partition, (q_desc, do_desc, dot_desc, k_desc, v_desc, lse_desc, delta_desc,
                               q0, do0, dot0, lse0, delta0, k0, v0, ready0, empty0, kv_ready0,
                               kv_empty0, Items, Starts, ColPtr, QBlock, n_kv_tiles, num_heads,
                               kv_heads, q_per_kv, heads_per_pattern, kv_blocks, stat_stride,
                               seq_k - seq_q, BLOCK_SIZE, 0)),
            (_load_partition, (q_desc, do_desc, dot_desc, k_desc, v_desc, lse_desc, delta_desc,
                               q1, do1, dot1, lse1, delta1, k1, v1, ready1, empty1, kv_ready1,
                               kv_empty1, Items, Starts, ColPtr, QBlock, n_kv_tiles, num_heads,
                               kv_heads, q_per_kv, heads_per_pattern, kv_blocks, stat_stride,
                               seq_k - seq_q, BLOCK_SIZE, 1)),
        ], [4, 1, 1], [240, 24, 24])


STAGES = 2  # two pipelines of two stages fill 180 KB of shared memory at head_dim 128


def refusal(q: torch.Tensor, layout: BlockLayout, seq_q: int, seq_k: int) -> str | None:
    """Why this kernel cannot take the call (None: it can); ``q`` gives the device and head_dim."""
    if not GLUON:
        return f"the Gluon fp8 dk/dv kernel needs Gluon, which triton {triton.__version__} lacks"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "the Gluon fp8 dk/dv kernel runs on a Hopper GPU only"
    if q.shape[3] not in (64, 128):
        return f"the Gluon fp8 dk/dv kernel needs head_dim 64 or 128, got {q.shape[3]}"
    if layout.block_size % KV_TILE:
        return f"the Gluon fp8 dk/dv kernel needs a block size that is a multiple of {KV_TILE}"
    if (seq_k - seq_q) % 32:
        return "the Gluon fp8 dk/dv kernel needs seq_k - seq_q to be a multiple of 32"
    return None


def sparse_attention_fp8_dkdv_ws(q16: torch.Tensor, k16: torch.Tensor, v8: torch.Tensor,
                                 do8: torch.Tensor, do8_t: torch.Tensor, lse: torch.Tensor,
                                 delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                                 do_descale: torch.Tensor, v_descale: torch.Tensor,
                                 layout: BlockLayout, cols: ColumnPlan, sm_scale: float) -> None:
    """dk, dv into ``dk`` and ``dv`` for a call :func:`refusal` accepts: q16, k16 the bf16
    dequantised q and k ``(b, h, s, d)``; v8 e4m3 ``(b, hkv, s_k, d)`` (descaled by
    ``v_descale``, ``(b, hkv)``); do8 e4m3 ``(b, h, s_q, d)`` and do8_t its transpose with the
    query axis reordered in runs of 32 (zero-padded to a multiple of 32), both descaled by
    ``do_descale`` (one per (batch, kv head), contiguous); lse natural-log, delta from do8."""
    batch, heads, seq_q, head_dim = q16.shape
    kv_heads, seq_k = k16.shape[1], k16.shape[2]
    programs = _sm_count(q16.device)
    work = dkdv_items(layout, cols, seq_q, seq_k, batch, heads, kv_heads, programs, q16.device)
    # The shift of p into [0, 2**P_SHIFT] rides in the LSE (log2 units in row_statistics).
    stats = row_statistics(lse - P_SHIFT.value / LOG2E.value, delta, seq_k)
    grid = ((len(work.starts) - 1) // 2,)
    _fp8_bwd_dkdv_ws[grid](
        _descriptor(q16, Q_TILE, head_dim), _descriptor(do8, Q_TILE, head_dim),
        _descriptor(do8_t, head_dim, Q_TILE, swizzle=64), _descriptor(k16, KV_TILE, head_dim),
        _descriptor(v8, KV_TILE, head_dim), _stat_descriptor(stats[0]),
        _stat_descriptor(stats[1]), dk, dv, do_descale, v_descale,
        work.items, work.starts, cols.col_ptr, cols.n_full, cols.q_block,
        *dk.stride(), *dv.stride(), *v_descale.stride(),
        triton.cdiv(seq_k, KV_TILE), heads, kv_heads, heads // kv_heads, heads // layout.heads,
        cols.kv_blocks, seq_q, seq_k, stats.shape[2], qk_scale(sm_scale), sm_scale,
        HEAD_DIM=head_dim, BLOCK_SIZE=layout.block_size, IS_CAUSAL=layout.causal,
        STAGES=STAGES, num_warps=4, maxnreg=MAX_REGS,
    )


# -- the form's launch order ------------------------------------------------------------------------


def gluon_gradients(do: torch.Tensor, q8: torch.Tensor, k8: torch.Tensor, v_t: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, layout: BlockLayout,
                    descales: tuple[torch.Tensor, ...], sm_scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (bf16) of checked ``(b, h, s, d)`` views for a call :func:`refusal` takes: dq
    by the 16-bit dq kernel on the bf16 dequantised inputs, dk and dv by this module's kernel."""
    batch, heads, seq_q, _ = q8.shape
    kv_heads, seq_k = k8.shape[1], k8.shape[2]
    q16, k16, v16 = dequantised_inputs(q8, k8, v_t, descales)
    do16, out16 = do.to(torch.bfloat16), out.to(torch.bfloat16)
    # -- dq: the 16-bit kernel on the dequantised inputs --
    dq = bwd.grad_like(q16)
    delta16 = buffers.new_output((batch, heads, seq_q), q16, torch.float32)
    dq_config = select.resolve_config("dq", q16, layout, seq_k)[0]
    bwd.launch_dq(do16, q16, k16, v16, out16, lse, delta16, dq, layout, sm_scale, dq_config)
    # -- dO in e4m3, one descale per (batch, kv group); dOᵀ reordered; delta of that dO --
    do8, do8_t, delta8, do_descale = quantised_do(do16, out16, heads // kv_heads, reorder=True)
    v8 = v_t.transpose(2, 3).contiguous()
    dk, dv = bwd.grad_like(k16), bwd.grad_like(k16)
    sparse_attention_fp8_dkdv_ws(q16, k16, v8, do8, do8_t, lse, delta8, dk, dv, do_descale,
                                 descales[2], layout, column_plan(layout, seq_q, seq_k),
                                 sm_scale)
    return dq, dk, dv
