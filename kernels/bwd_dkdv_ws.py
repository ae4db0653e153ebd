"""Warp-specialised dk/dv kernel for Hopper, written in Gluon (bwd configs with ``impl="gluon"``).

The Triton dk/dv kernel's work (:mod:`kernels.bwd`: one 64-key kv tile, the query blocks that
keep it for each query head of its GQA group, from the pattern's column form) split across warps
by job. Each program hosts two independent pipelines, each a loader warp and a consumer warp
group: the loader copies the item's k and v tiles once, then streams the 64-row q and dO tiles
of every step through a ring of stages; the consumer holds dk and dv in registers and per step
takes sᵀ = k qᵀ and dpᵀ = v dOᵀ from shared memory, pᵀ = exp2(sᵀ * scale - lse), dv += pᵀ dO,
dsᵀ = pᵀ * (dpᵀ - delta) and dk += dsᵀ q with pᵀ and dsᵀ from registers. A step's dk product
is issued by the next step, ahead of that step's own sᵀ and dpᵀ, so the tensor cores get the
three back to back. The two consumers' products and elementwise work overlap on the SM's
tensor cores. Persistent: program ``p`` runs
the work items of schedule rows ``2p`` and ``2p + 1`` (one per pipeline), dealt by their steps
(:mod:`kernels.schedule`), so a kv tile kept by a vertical column's long run of query blocks
does not hold a whole SM for its length.

Each step's 64 rows of lse and delta come with its q and dO tiles, as flat tensor-memory copies
from an aligned copy of both (:func:`row_statistics`); the consumer reads them from shared
memory as it needs them. Calls it cannot take run the Triton dk/dv kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from .columns import ColumnPlan
from .common import LOG2E, qk_scale
from .fwd_ws import GLUON, MAX_REGS, _descriptor, _sm_count
from .layout import BlockLayout
from .schedule import balanced_schedule

if GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    from .fwd_ws import _reinterpret, _tma_load

KV_TILE = 64  # keys of a work item's kv tile
Q_TILE = 64  # query rows a step
KV_ROWS = triton.language.constexpr(KV_TILE)  # the same, for the kernels
Q_ROWS = triton.language.constexpr(Q_TILE)
# A work item's fixed cost in steps (k and v copied in, dk and dv stored), for the deal.
ITEM_OVERHEAD = 2.0
STAGE_CHOICES = (2, 3)


def shared_bytes(head_dim: int, stages: int) -> int:
    """Shared memory of the kernel: per pipeline, its k and v tiles and ``stages`` q and dO
    tiles (16-bit) with their rows' lse and delta (fp32), and the barriers."""
    per_stage = 2 * Q_TILE * head_dim * 2 + 2 * Q_TILE * 4
    return 2 * (2 * KV_TILE * head_dim * 2 + stages * per_stage) + 1024


if GLUON:
    @gluon.jit
    def _item(w, n_kv_tiles, kv_heads):
        """Work item ``w`` (kv tiles fastest, then batch x kv head): kv tile, batch, kv head."""
        zkv = w // n_kv_tiles
        return w % n_kv_tiles, zkv // kv_heads, zkv % kv_heads

    @gluon.jit
    def _load_partition(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_bufs, do_bufs,
                        lse_bufs, delta_bufs, k_smem, v_smem, ready, empty, kv_ready, kv_empty,
                        Items, Starts, ColPtr, QBlock, n_kv_tiles, num_heads, kv_heads, q_per_kv,
                        heads_per_pattern, kv_blocks, stat_stride, q_offset,
                        BLOCK_SIZE: gl.constexpr, PIPE: gl.constexpr):
        """Loader warp of pipeline ``PIPE``: each work item's k and v (once the consumer is done
        with the last item's), then the q and dO tiles of its steps, with their rows' lse and
        delta, through the stages."""
        stages: gl.constexpr = ready.shape[0]
        N_SUB: gl.constexpr = BLOCK_SIZE // Q_ROWS
        KV_N_SUB: gl.constexpr = BLOCK_SIZE // KV_ROWS
        prog = 2 * gl.program_id(0) + PIPE
        g = 0  # steps issued so far: the ring position
        i = 0  # items so far: the k/v buffers' phase
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
                # lse and delta are read flat from (batch x heads, stat_stride) copies, where
                # each row's statistics sit at its query's absolute position (every step's
                # copy starts 16-byte aligned).
                stat = (off_z * num_heads + off_h) * stat_stride + q_offset
                for t in range(gl.load(ColPtr + row) * N_SUB, gl.load(ColPtr + row + 1) * N_SUB):
                    start_m = (gl.load(QBlock + t // N_SUB) * BLOCK_SIZE + (t % N_SUB) * Q_ROWS
                               - q_offset)
                    s = g % stages
                    # Barriers start in the completed phase: the first pass runs free.
                    mbarrier.wait(empty.index(s), ((g // stages) & 1) ^ 1)
                    mbarrier.expect(ready.index(s), 2 * q_desc.block_type.nbytes
                                    + 2 * lse_desc.block_type.nbytes)
                    # Rows before the first query or past the last read zeros, which the
                    # consumer masks.
                    _tma_load(q_desc, [off_z, off_h, start_m, 0], ready.index(s), q_bufs.index(s))
                    _tma_load(do_desc, [off_z, off_h, start_m, 0], ready.index(s),
                              do_bufs.index(s))
                    _tma_load(lse_desc, [stat + start_m], ready.index(s), lse_bufs.index(s))
                    _tma_load(delta_desc, [stat + start_m], ready.index(s), delta_bufs.index(s))
                    g += 1
            i += 1

    @gluon.jit
    def _dkdv_step(dk, dv, ds_prev, k_op, v_op, q_bufs, do_bufs, lse_bufs, delta_bufs, ready,
                   empty, g, g0, t, MASKED: gl.constexpr, QBlock, offs_n, q_offset, seq_q,
                   qk_scale, BLOCK_SIZE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                   s_layout: gl.constexpr, op_layout: gl.constexpr, EARLY_STATS: gl.constexpr):
        """One step: the query rows of column entry ``t // N_SUB``'s sub-tile ``t % N_SUB``,
        in ring slot ``g`` (``g0`` the item's first step). Its dk product is left to the next
        step, which issues it with its own sᵀ and dpᵀ: ``ds_prev`` is the last step's dsᵀ
        operand, and the step returns its own. With ``EARLY_STATS`` the rows' lse and delta
        are read before the products they follow are waited for."""
        stages: gl.constexpr = ready.shape[0]
        N_SUB: gl.constexpr = BLOCK_SIZE // Q_ROWS
        s = g % stages
        zero = gl.zeros([KV_ROWS, Q_ROWS], gl.float32, s_layout)
        mbarrier.wait(ready.index(s), (g // stages) & 1)
        q_tile = q_bufs.index(s)
        do_tile = do_bufs.index(s)
        # The last step's dk product (its q tile is still held); an item's first step adds a
        # zero product with its own tile.
        prev = (g - (g > g0).to(gl.int32)) % stages
        dk = warpgroup_mma(ds_prev, q_bufs.index(prev), dk, is_async=True)
        st = warpgroup_mma(k_op, q_tile.permute((1, 0)), zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_op, do_tile.permute((1, 0)), zero, use_acc=False, is_async=True)
        rows: gl.constexpr = gl.SliceLayout(0, s_layout)
        # The statistics come from shared memory as they are needed: kept in registers from
        # the step's start they would hold 16 a thread each. lse is in log2 units already.
        if EARLY_STATS:
            lse = lse_bufs.index(s).load(rows)
        # wgmma groups retire in order: one left outstanding means dk and sᵀ are done.
        st, dk = warpgroup_mma_wait(1, deps=(st, dk))
        if g > g0:
            mbarrier.arrive(empty.index(prev), count=1)
        if not EARLY_STATS:
            lse = lse_bufs.index(s).load(rows)
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        if MASKED:
            start_m_abs = gl.load(QBlock + t // N_SUB) * BLOCK_SIZE + (t % N_SUB) * Q_ROWS
            offs_m_abs = start_m_abs + gl.arange(0, Q_ROWS, layout=rows)
            offs_m = offs_m_abs - q_offset
            keep = gl.expand_dims((offs_m >= 0) & (offs_m < seq_q), 0)
            if IS_CAUSAL:
                keep = keep & (gl.expand_dims(offs_m_abs, 0) >= gl.expand_dims(offs_n, 1))
            pt = gl.where(keep, pt, 0.0)
        if EARLY_STATS:
            delta = delta_bufs.index(s).load(rows)
        dv = warpgroup_mma(gl.convert_layout(pt.to(q_tile.dtype), op_layout), do_tile, dv,
                           is_async=True)
        dpt = warpgroup_mma_wait(1, deps=(dpt,))
        if not EARLY_STATS:
            delta = delta_bufs.index(s).load(rows)
        dst = pt * (dpt - gl.expand_dims(delta, 0))
        ds_op = gl.convert_layout(dst.to(q_tile.dtype), op_layout)
        # No product is left in flight across steps: ptxas serialises every wgmma otherwise.
        dv = warpgroup_mma_wait(0, deps=(dv,))
        return dk, dv, ds_op

    @gluon.jit
    def _dkdv_partition(q_bufs, do_bufs, lse_bufs, delta_bufs, k_smem, v_smem, ready, empty,
                        kv_ready, kv_empty, Items, Starts, ColPtr, NFull, QBlock, DK, DV,
                        stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                        stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                        n_kv_tiles, kv_heads, q_per_kv, heads_per_pattern, kv_blocks,
                        seq_q, seq_k, qk_scale, sm_scale,
                        HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                        IS_CAUSAL: gl.constexpr, PIPE: gl.constexpr):
        """Consumer warp group of pipeline ``PIPE``: dk and dv of each of its work items."""
        NUM_WARPS: gl.constexpr = 4
        N_SUB: gl.constexpr = BLOCK_SIZE // Q_ROWS
        KV_N_SUB: gl.constexpr = BLOCK_SIZE // KV_ROWS
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, Q_ROWS, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        # At head_dim 128 the early reads spill (registers for 32 more values): measured 2-5%
        # slower there, 2-3% faster at 64 (kernels/PERF.md).
        EARLY_STATS: gl.constexpr = HEAD_DIM <= 64
        q_offset = seq_k - seq_q
        prog = 2 * gl.program_id(0) + PIPE
        g = 0  # steps consumed so far: the ring position
        i = 0  # items so far: the k/v buffers' phase
        for slot in range(gl.load(Starts + prog), gl.load(Starts + prog + 1)):
            kv_tile, off_z, off_kvh = _item(gl.load(Items + slot), n_kv_tiles, kv_heads)
            kv_block = kv_tile // KV_N_SUB
            offs_n = kv_tile * KV_ROWS + gl.arange(0, KV_ROWS, layout=gl.SliceLayout(1, s_layout))
            dk = gl.zeros([KV_ROWS, HEAD_DIM], gl.float32, o_layout)
            dv = gl.zeros([KV_ROWS, HEAD_DIM], gl.float32, o_layout)
            ds = gl.zeros([KV_ROWS, Q_ROWS], DK.dtype.element_ty, op_layout)
            mbarrier.wait(kv_ready, i & 1)
            g0 = g
            for gq in range(0, q_per_kv):
                off_h = off_kvh * q_per_kv + gq
                row = (off_h // heads_per_pattern) * kv_blocks + kv_block
                start = gl.load(ColPtr + row)
                mid = start + gl.load(NFull + row)
                end = gl.load(ColPtr + row + 1)
                # The entries no step masks, then those that need it.
                for t in range(start * N_SUB, mid * N_SUB):
                    dk, dv, ds = _dkdv_step(dk, dv, ds, k_smem, v_smem, q_bufs, do_bufs,
                                            lse_bufs, delta_bufs, ready, empty, g, g0, t, False,
                                            QBlock, offs_n, q_offset, seq_q, qk_scale,
                                            BLOCK_SIZE, IS_CAUSAL, s_layout, op_layout,
                                            EARLY_STATS)
                    g += 1
                for t in range(mid * N_SUB, end * N_SUB):
                    dk, dv, ds = _dkdv_step(dk, dv, ds, k_smem, v_smem, q_bufs, do_bufs,
                                            lse_bufs, delta_bufs, ready, empty, g, g0, t, True,
                                            QBlock, offs_n, q_offset, seq_q, qk_scale,
                                            BLOCK_SIZE, IS_CAUSAL, s_layout, op_layout,
                                            EARLY_STATS)
                    g += 1
            if g > g0:  # the last step's dk product
                last = (g - 1) % ready.shape[0]
                dk = warpgroup_mma(ds, q_bufs.index(last), dk, is_async=True)
                dk = warpgroup_mma_wait(0, deps=(dk,))
                mbarrier.arrive(empty.index(last), count=1)
            mbarrier.arrive(kv_empty, count=1)  # every product reading k and v is done

            # -- epilogue: dS was taken w.r.t. the scaled scores --
            offs_n_o = kv_tile * KV_ROWS + gl.arange(0, KV_ROWS,
                                                     layout=gl.SliceLayout(1, o_layout))
            offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            n_ok = gl.expand_dims(offs_n_o < seq_k, 1)
            rows = gl.expand_dims(offs_n_o.to(gl.int64), 1)
            dk_ptrs = (DK + off_z.to(gl.int64) * stride_dkz + off_kvh.to(gl.int64) * stride_dkh
                       + rows * stride_dkn + gl.expand_dims(offs_d * stride_dkk, 0))
            gl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok)
            dv_ptrs = (DV + off_z.to(gl.int64) * stride_dvz + off_kvh.to(gl.int64) * stride_dvh
                       + rows * stride_dvn + gl.expand_dims(offs_d * stride_dvk, 0))
            gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok)
            i += 1

    @gluon.jit
    def _bwd_dkdv_ws(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, DK, DV, Items, Starts,
                     ColPtr, NFull, QBlock,
                     stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                     stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                     n_kv_tiles, num_heads, kv_heads, q_per_kv, heads_per_pattern, kv_blocks,
                     seq_q, seq_k, stat_stride, qk_scale, sm_scale,
                     HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                     STAGES: gl.constexpr):
        """Persistent, two pipelines a program: pipeline ``c`` of program ``p`` takes the work
        items in rows ``Starts[2p+c]:Starts[2p+c+1]`` of ``Items``."""
        q_layout: gl.constexpr = q_desc.layout
        kv_layout: gl.constexpr = k_desc.layout
        dtype: gl.constexpr = q_desc.dtype
        # The descriptors' boxes are (1, 1, rows, dim): the same bytes as (rows, dim) tiles.
        tile_kv: gl.constexpr = [KV_ROWS, HEAD_DIM]
        q0 = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, Q_ROWS, HEAD_DIM], q_layout)
        do0 = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, Q_ROWS, HEAD_DIM], q_layout)
        q1 = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, Q_ROWS, HEAD_DIM], q_layout)
        do1 = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, Q_ROWS, HEAD_DIM], q_layout)
        k0 = gl.allocate_shared_memory(dtype, [1, 1, KV_ROWS, HEAD_DIM], kv_layout)
        v0 = gl.allocate_shared_memory(dtype, [1, 1, KV_ROWS, HEAD_DIM], kv_layout)
        k1 = gl.allocate_shared_memory(dtype, [1, 1, KV_ROWS, HEAD_DIM], kv_layout)
        v1 = gl.allocate_shared_memory(dtype, [1, 1, KV_ROWS, HEAD_DIM], kv_layout)
        stat_layout: gl.constexpr = lse_desc.layout
        lse0 = gl.allocate_shared_memory(gl.float32, [STAGES, Q_ROWS], stat_layout)
        delta0 = gl.allocate_shared_memory(gl.float32, [STAGES, Q_ROWS], stat_layout)
        lse1 = gl.allocate_shared_memory(gl.float32, [STAGES, Q_ROWS], stat_layout)
        delta1 = gl.allocate_shared_memory(gl.float32, [STAGES, Q_ROWS], stat_layout)
        ready0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ready1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_ready0 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_empty0 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_ready1 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_empty1 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready0.index(i), count=1)
            mbarrier.init(empty0.index(i), count=1)
            mbarrier.init(ready1.index(i), count=1)
            mbarrier.init(empty1.index(i), count=1)
        mbarrier.init(kv_ready0, count=1)
        mbarrier.init(kv_empty0, count=1)
        mbarrier.init(kv_ready1, count=1)
        mbarrier.init(kv_empty1, count=1)
        tiles_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_ROWS, HEAD_DIM],
                                                                          dtype)
        q_tiles0 = _reinterpret(q0, dtype, [STAGES, Q_ROWS, HEAD_DIM], tiles_layout)
        do_tiles0 = _reinterpret(do0, dtype, [STAGES, Q_ROWS, HEAD_DIM], tiles_layout)
        q_tiles1 = _reinterpret(q1, dtype, [STAGES, Q_ROWS, HEAD_DIM], tiles_layout)
        do_tiles1 = _reinterpret(do1, dtype, [STAGES, Q_ROWS, HEAD_DIM], tiles_layout)
        k_tile0 = k0.reshape(tile_kv)
        v_tile0 = v0.reshape(tile_kv)
        k_tile1 = k1.reshape(tile_kv)
        v_tile1 = v1.reshape(tile_kv)

        # Constexprs written into each partition's tuple (a tuple variable would make them
        # runtime values).
        gl.warp_specialize([
            (_dkdv_partition, (q_tiles0, do_tiles0, lse0, delta0, k_tile0, v_tile0, ready0,
                               empty0, kv_ready0, kv_empty0, Items, Starts, ColPtr, NFull,
                               QBlock, DK, DV, stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                               stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                               n_kv_tiles, kv_heads, q_per_kv, heads_per_pattern,
                               kv_blocks, seq_q, seq_k, qk_scale, sm_scale,
                               HEAD_DIM, BLOCK_SIZE, IS_CAUSAL, 0)),
            (_dkdv_partition, (q_tiles1, do_tiles1, lse1, delta1, k_tile1, v_tile1, ready1,
                               empty1, kv_ready1, kv_empty1, Items, Starts, ColPtr, NFull,
                               QBlock, DK, DV, stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                               stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                               n_kv_tiles, kv_heads, q_per_kv, heads_per_pattern,
                               kv_blocks, seq_q, seq_k, qk_scale, sm_scale,
                               HEAD_DIM, BLOCK_SIZE, IS_CAUSAL, 1)),
            (_load_partition, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q0, do0,
                               lse0, delta0, k0, v0, ready0, empty0, kv_ready0, kv_empty0,
                               Items, Starts, ColPtr, QBlock, n_kv_tiles, num_heads, kv_heads,
                               q_per_kv, heads_per_pattern, kv_blocks, stat_stride, seq_k - seq_q,
                               BLOCK_SIZE, 0)),
            (_load_partition, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q1, do1,
                               lse1, delta1, k1, v1, ready1, empty1, kv_ready1, kv_empty1,
                               Items, Starts, ColPtr, QBlock, n_kv_tiles, num_heads, kv_heads,
                               q_per_kv, heads_per_pattern, kv_blocks, stat_stride, seq_k - seq_q,
                               BLOCK_SIZE, 1)),
        ], [4, 1, 1], [240, 24, 24])  # registers a thread: see fwd_ws.MAX_REGS


@dataclass(frozen=True)
class DkdvItems:
    """Pipeline ``c`` of program ``p`` takes rows ``starts[2p+c]:starts[2p+c+1]`` of
    ``items`` (item numbers: kv tile fastest, then batch x kv head)."""

    items: torch.Tensor  # int32 (n_items,)
    starts: torch.Tensor  # int32 (2 * programs + 1,)


def dkdv_items(layout: BlockLayout, cols: ColumnPlan, seq_q: int, seq_k: int, batch: int,
               heads: int, kv_heads: int, programs: int, device: torch.device) -> DkdvItems:
    """Deal the (kv tile, batch x kv head) items to two pipelines of up to ``programs``
    programs, balanced by their steps in ``cols`` (the layout's column plan for these lengths;
    cached per shape)."""
    def build() -> DkdvItems:
        bs = layout.block_size
        n_kv_tiles = math.ceil(seq_k / KV_TILE)
        col_ptr = cols.col_ptr.cpu().long()
        entries = col_ptr[1:] - col_ptr[:-1]  # (pattern heads * kv blocks,)
        q_per_kv, per_pattern = heads // kv_heads, heads // layout.heads
        head = torch.arange(heads)
        kv_block = torch.arange(n_kv_tiles) // (bs // KV_TILE)
        rows = (head // per_pattern)[:, None] * cols.kv_blocks + kv_block[None, :]
        steps = entries[rows] * (bs // Q_TILE)  # (heads, kv tiles)
        group = steps.view(kv_heads, q_per_kv, n_kv_tiles).sum(1)  # (kv heads, kv tiles)
        cost = (group.double() + ITEM_OVERHEAD).repeat(batch, 1).flatten()
        pipes = min(len(cost), 2 * programs)
        sched = balanced_schedule(cost, pipes)
        starts = sched.starts
        if pipes % 2:  # a program's second pipeline with no items
            starts = torch.cat([starts, starts[-1:]])
        return DkdvItems(sched.order.to(device), starts.to(device))

    key = ("dkdv_ws_items", seq_q, seq_k, batch, heads, kv_heads, programs, str(device))
    return layout.cached(key, build)


def row_statistics(lse: torch.Tensor, delta: torch.Tensor, seq_k: int) -> torch.Tensor:
    """lse and delta (``(batch, heads, seq_q)`` float32) as the kernel reads them: one
    ``(2, batch x heads, stride)`` copy, zeros but at each row's absolute position (the queries
    are the last ``seq_q`` of ``seq_k``), ``stride`` the next multiple of 4 from ``seq_k``;
    lse in log2 units (times log2 e), as the kernel's exp2 takes it.
    The rows' 16-byte-aligned starts let each step take its 64 rows in one tensor-memory copy
    from any row; 8 bytes a query row."""
    batch, heads, seq_q = lse.shape
    stride = -(-seq_k // 4) * 4
    stats = torch.zeros((2, batch * heads, stride), device=lse.device, dtype=torch.float32)
    stats[0, :, seq_k - seq_q:seq_k] = lse.reshape(batch * heads, seq_q) * LOG2E.value
    stats[1, :, seq_k - seq_q:seq_k] = delta.reshape(batch * heads, seq_q)
    return stats


def _stat_descriptor(rows: torch.Tensor) -> "GluonDescriptor":
    """One of :func:`row_statistics`' two ``(batch x heads, stride)`` planes, read flat, a
    step's 64 rows a copy."""
    flat = rows.reshape(-1)
    layout = gl.NVMMASharedLayout.get_default_for([Q_TILE], gl.float32)
    return GluonDescriptor(flat, list(flat.shape), list(flat.stride()), [Q_TILE], layout)


def sparse_attention_dkdv_ws(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                             dk: torch.Tensor, dv: torch.Tensor, layout: BlockLayout,
                             cols: ColumnPlan, sm_scale: float, stages: int) -> None:
    """dk and dv into ``dk`` and ``dv`` for a call :func:`kernels.bwd_dq_ws.refusal` accepts
    (the same tensor-memory rules), reading the
    ``delta`` the dq kernel wrote and the layout's column plan ``cols``
    (:func:`kernels.columns.column_plan`); ``stages`` q/dO tiles in flight per pipeline."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    programs = _sm_count(q.device)
    work = dkdv_items(layout, cols, seq_q, seq_k, batch, heads, kv_heads, programs, q.device)
    stats = row_statistics(lse, delta, seq_k)
    grid = ((len(work.starts) - 1) // 2,)
    _bwd_dkdv_ws[grid](
        _descriptor(q, Q_TILE, head_dim), _descriptor(do, Q_TILE, head_dim),
        _descriptor(k, KV_TILE, head_dim), _descriptor(v, KV_TILE, head_dim),
        _stat_descriptor(stats[0]), _stat_descriptor(stats[1]),
        dk, dv, work.items, work.starts, cols.col_ptr, cols.n_full, cols.q_block,
        *dk.stride(), *dv.stride(),
        triton.cdiv(seq_k, KV_TILE), heads, kv_heads, heads // kv_heads, heads // layout.heads,
        cols.kv_blocks, seq_q, seq_k, stats.shape[2], qk_scale(sm_scale), sm_scale,
        HEAD_DIM=head_dim, BLOCK_SIZE=layout.block_size, IS_CAUSAL=layout.causal,
        STAGES=stages, num_warps=4, maxnreg=MAX_REGS,
    )
