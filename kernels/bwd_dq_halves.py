"""The Gluon dq kernel (:mod:`kernels.bwd_dq_ws`) on owned steps (:mod:`kernels.halves_plan`):
each half of a 128-row query tile multiplies only the kv blocks its own rows keep.

The loader, the score and gradient arithmetic and delta's computation are
:mod:`kernels.bwd_dq_ws`'s; the consumer walks its own half's list of steps as the forward's
(:mod:`kernels.fwd_halves`) does: a step of the other half's is passed, the k-th steps of the
two halves share a turn for as many steps as the shorter list has, and the last ds k is issued
as soon as the half's own steps end. :func:`kernels.halves_plan.halves_pay` decides where it
runs instead of the union's kernel.
"""

from __future__ import annotations

import math

import torch

from .common import LOG2E, qk_scale
from .fwd_ws import BLOCK_M, BOX_N, GLUON, MAX_REGS, _descriptor, _sm_count
from .halves_plan import BOX_CHOICES, MIN_STAGES, halves_items
from .layout import BlockLayout

if GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma_wait

    from .bwd_dq_ws import _grad_scores, _issue_dq, _load_partition, _row_delta
    from .fwd_halves import _skip_step, _take_turn_if
    from .fwd_ws import _read_item, _reinterpret, _work_item
    from .ws_mma import _issue_transposed

    @gluon.jit
    def _dq_halves_partition(q_smem, do_smem, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                             v_ready, kv_empty, turns, Items, Starts, KvBlock, RowBits, Steps,
                             Out, DQ, Lse, Delta, stride_oz, stride_oh, stride_om, stride_ok,
                             stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                             n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale,
                             sm_scale, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                             BLOCK_SIZE: gl.constexpr, BOX_N: gl.constexpr,
                             IS_CAUSAL: gl.constexpr, HALF: gl.constexpr):
        """One consumer warp group: rows ``HALF * 64`` on of each item's tile, through the steps
        its half owns (bwd_dq_ws._dq_partition's pipeline over them: a step's q kᵀ and dO vᵀ
        issued with this half's last step's ds k), then dq's store."""
        NUM_WARPS: gl.constexpr = 4
        ROWS: gl.constexpr = BLOCK_M // 2
        SUB_BLOCKS: gl.constexpr = BLOCK_M // BLOCK_SIZE
        TILE_N: gl.constexpr = k_bufs.shape[1]
        stages: gl.constexpr = k_bufs.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, TILE_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
        ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
        DTYPE: gl.constexpr = q_smem.dtype
        q_op = q_smem.slice(HALF * ROWS, ROWS)
        do_op = do_smem.slice(HALF * ROWS, ROWS)
        q_offset = seq_k - seq_q
        g = 0  # kv steps consumed so far by this program: the ring position
        i = 0  # work items so far: the q buffer's phase
        turn = 0  # turns taken so far
        pid = gl.program_id(0)
        for slot in range(gl.load(Starts + pid), gl.load(Starts + pid + 1)):
            w, first_entry, n_entries, step_word, _unused = _read_item(Items, slot)
            tile, off_zh, off_z, off_h, off_kvh = _work_item(w, n_tiles, first_tile, num_heads,
                                                             q_per_kv)
            row0 = tile * BLOCK_M + HALF * ROWS
            offs_m_abs = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            offs_m = offs_m_abs - q_offset
            row_ok = (offs_m >= 0) & (offs_m < seq_q)
            stat_base = off_zh.to(gl.int64) * seq_q
            lse = gl.load(Lse + stat_base + offs_m, mask=row_ok, other=0.0) * LOG2E
            tile_first_block = tile * BLOCK_M // BLOCK_SIZE
            if IS_CAUSAL:
                row_end = gl.minimum((tile + 1) * BLOCK_M, seq_k)
            else:
                row_end = seq_k
            steps = n_entries // (TILE_N // BOX_N)
            own = step_word + gl.load(Steps + step_word + 2 * HALF)
            n_own = gl.load(Steps + step_word + 2 * HALF + 1)
            turns_here = gl.minimum(gl.load(Steps + step_word + 1),
                                    gl.load(Steps + step_word + 3))
            last_own = -1
            acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)

            mbarrier.wait(q_ready, i & 1)
            offs_m_r = row0 - q_offset + gl.arange(0, ROWS, layout=gl.SliceLayout(1, row_layout))
            row_ok_r = (offs_m_r >= 0) & (offs_m_r < seq_q)
            delta_r = _row_delta(do_op, Out, off_z, off_h, offs_m_r, row_ok_r, stride_oz,
                                 stride_oh, stride_om, stride_ok, HEAD_DIM, row_layout)
            gl.store(Delta + stat_base + offs_m_r, delta_r, mask=row_ok_r)
            delta = gl.convert_layout(delta_r, gl.SliceLayout(1, s_layout))

            if n_own > 0:
                word = gl.load(Steps + own)
                prev = word >> 1
                for j in range(0, prev):
                    _skip_step(k_ready, kv_empty, g + j, -1)
                _take_turn_if(turns, turn, HALF, turns_here > 0)
                s = _issue_transposed(q_op, k_bufs, k_ready, g + prev, s_layout)
                dp = _issue_transposed(do_op, v_bufs, v_ready, g + prev, s_layout)
                mbarrier.arrive(turns.index(1 - HALF), count=1, pred=turns_here > 0)
                s = warpgroup_mma_wait(1, deps=(s,))
                dp = warpgroup_mma_wait(0, deps=(dp,))
                ds = _grad_scores(s, dp, lse, delta, prev, (word & 1) != 0, first_entry,
                                  n_entries, KvBlock, RowBits, offs_m_abs, tile_first_block,
                                  row_end, seq_k, qk_scale, BOX_N, BLOCK_SIZE, SUB_BLOCKS,
                                  IS_CAUSAL, s_layout, ds_layout, DTYPE)
                for n in range(1, n_own):
                    word = gl.load(Steps + own + n)
                    j = word >> 1
                    if j - prev == 2:  # the other half's step between two of this half's
                        _skip_step(k_ready, kv_empty, g + prev + 1, -1)
                    _take_turn_if(turns, turn + n, HALF, n < turns_here)
                    s = _issue_transposed(q_op, k_bufs, k_ready, g + j, s_layout)
                    dp = _issue_transposed(do_op, v_bufs, v_ready, g + j, s_layout)
                    acc = _issue_dq(ds, acc, k_bufs, g + prev)
                    mbarrier.arrive(turns.index(1 - HALF), count=1, pred=n < turns_here)
                    # wgmma groups retire in order: s first, then dp, then the last ds k.
                    s = warpgroup_mma_wait(2, deps=(s,))
                    dp = warpgroup_mma_wait(1, deps=(dp,))
                    ds_next = _grad_scores(s, dp, lse, delta, j, (word & 1) != 0, first_entry,
                                           n_entries, KvBlock, RowBits, offs_m_abs,
                                           tile_first_block, row_end, seq_k, qk_scale, BOX_N,
                                           BLOCK_SIZE, SUB_BLOCKS, IS_CAUSAL, s_layout,
                                           ds_layout, DTYPE)
                    acc = warpgroup_mma_wait(0, deps=(acc,))
                    mbarrier.arrive(kv_empty.index((g + prev) % stages), count=1)
                    ds = ds_next
                    prev = j
                mbarrier.arrive(q_empty, count=1)  # every product reading q and dO is done
                acc = _issue_dq(ds, acc, k_bufs, g + prev)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(kv_empty.index((g + prev) % stages), count=1)
                last_own = prev
            else:
                mbarrier.arrive(q_empty, count=1)  # this half multiplies nothing in this item
            for j in range(last_own + 1, steps):
                _skip_step(k_ready, kv_empty, g + j, -1)

            # -- epilogue: dS was taken w.r.t. the scaled scores --
            dq = acc * sm_scale
            offs_m_o = row0 - q_offset + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
            offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            dq_base = off_z.to(gl.int64) * stride_dqz + off_h.to(gl.int64) * stride_dqh
            dq_ptrs = (DQ + dq_base + gl.expand_dims(offs_m_o.to(gl.int64) * stride_dqm, 1)
                       + gl.expand_dims(offs_d * stride_dqk, 0))
            rows_ok = (offs_m_o >= 0) & (offs_m_o < seq_q)
            gl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=gl.expand_dims(rows_ok, 1))
            g += steps
            turn += turns_here
            i += 1

    @gluon.jit
    def _bwd_dq_halves(q_desc, do_desc, k_desc, v_desc, Out, DQ, Lse, Delta, Items, Starts,
                       KvBlock, RowBits, Steps, stride_oz, stride_oh, stride_om, stride_ok,
                       stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                       num_heads, q_per_kv, seq_q, seq_k, n_tiles, first_tile, qk_scale, sm_scale,
                       BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                       IS_CAUSAL: gl.constexpr, BOXES: gl.constexpr, STAGES: gl.constexpr):
        """Persistent, as bwd_dq_ws._bwd_dq_ws, over :func:`kernels.halves_plan.halves_items`'
        work."""
        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, do_desc.block_type.shape,
                                            do_desc.layout)
        BOX_N: gl.constexpr = k_desc.block_type.shape[2]
        BOX_D: gl.constexpr = k_desc.block_type.shape[3]
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BOXES * BOX_N, HEAD_DIM],
                                                                       k_desc.dtype)
        box_slots: gl.constexpr = STAGES * BOXES * (HEAD_DIM // BOX_D)
        k_boxes = gl.allocate_shared_memory(k_desc.dtype, [box_slots] + k_desc.block_type.shape,
                                            k_desc.layout)
        v_boxes = gl.allocate_shared_memory(v_desc.dtype, [box_slots] + v_desc.block_type.shape,
                                            v_desc.layout)
        k_bufs = _reinterpret(k_boxes, k_desc.dtype, [STAGES, BOXES * BOX_N, HEAD_DIM], kv_layout)
        v_bufs = _reinterpret(v_boxes, v_desc.dtype, [STAGES, BOXES * BOX_N, HEAD_DIM], kv_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        mbarrier.init(q_empty, count=2)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(turns.index(i), count=1)
        q_tile = q_smem.reshape([BLOCK_M, HEAD_DIM])
        do_tile = do_smem.reshape([BLOCK_M, HEAD_DIM])

        gl.warp_specialize([
            (_dq_halves_partition, (q_tile, do_tile, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                                    v_ready, kv_empty, turns, Items, Starts, KvBlock, RowBits,
                                    Steps, Out, DQ, Lse, Delta,
                                    stride_oz, stride_oh, stride_om, stride_ok,
                                    stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                                    n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k,
                                    qk_scale, sm_scale, BLOCK_M, HEAD_DIM, BLOCK_SIZE, BOX_N,
                                    IS_CAUSAL, 0)),
            (_dq_halves_partition, (q_tile, do_tile, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                                    v_ready, kv_empty, turns, Items, Starts, KvBlock, RowBits,
                                    Steps, Out, DQ, Lse, Delta,
                                    stride_oz, stride_oh, stride_om, stride_ok,
                                    stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                                    n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k,
                                    qk_scale, sm_scale, BLOCK_M, HEAD_DIM, BLOCK_SIZE, BOX_N,
                                    IS_CAUSAL, 1)),
            (_load_partition, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_boxes,
                               v_boxes, q_ready, q_empty, k_ready, v_ready, kv_empty, Items,
                               Starts, KvBlock, n_tiles, first_tile, num_heads, q_per_kv,
                               seq_k - seq_q, BLOCK_M, BLOCK_SIZE, HEAD_DIM)),
        ], [4, 1], [240, 24])  # registers a thread: see fwd_ws.MAX_REGS


def sparse_attention_dq_halves(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                               delta: torch.Tensor, dq: torch.Tensor, layout: BlockLayout,
                               sm_scale: float, stages: int, boxes: int) -> None:
    """:func:`kernels.bwd_dq_ws.sparse_attention_dq_ws` on owned steps, for calls that kernel
    takes with 64-key blocks, at least three stages."""
    if stages < MIN_STAGES or boxes not in BOX_CHOICES:
        raise ValueError(f"owned steps need {MIN_STAGES} stages or more and 1 or 2 boxes a "
                         f"step, got {stages} stages and {boxes} boxes")
    if layout.block_size != BOX_N:
        raise ValueError(f"owned steps need {BOX_N}-key sparse blocks, got {layout.block_size}")
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    first_tile = (seq_k - seq_q) // BLOCK_M
    work = halves_items(layout, seq_k, first_tile, batch, heads, boxes, _sm_count(q.device),
                        q.device)
    box_d = 128 // q.element_size()
    _bwd_dq_halves[(len(work.starts) - 1,)](
        _descriptor(q, BLOCK_M, head_dim), _descriptor(do, BLOCK_M, head_dim),
        _descriptor(k, BOX_N, box_d), _descriptor(v, BOX_N, box_d), out, dq, lse, delta,
        work.items, work.starts, work.kv_block, work.row_bits, work.steps, *out.stride(),
        *dq.stride(), heads, heads // kv_heads, seq_q, seq_k,
        math.ceil(seq_k / BLOCK_M) - first_tile, first_tile, qk_scale(sm_scale), sm_scale,
        BLOCK_M=BLOCK_M, HEAD_DIM=head_dim, BLOCK_SIZE=layout.block_size,
        IS_CAUSAL=layout.causal, BOXES=boxes, STAGES=stages, num_warps=4, maxnreg=MAX_REGS,
    )
