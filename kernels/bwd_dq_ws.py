"""Warp-specialised dq kernel for Hopper, written in Gluon (dq configs with ``impl="gluon"``).

The dq kernel walks what the forward walks: for one 128-row query tile, the kept kv blocks of
its row, so it runs on the Gluon forward's machinery (:mod:`kernels.fwd_ws`: its balanced work
items, its 64-key tensor-memory copies gathered into 64- or 128-key stages, its masks). A loader
warp streams k and v through the stages after the item's q and dO tiles; two consumer warp
groups own 64 rows each and take turns at the tensor cores (ping-pong). Each step of a
consumer: s = q kᵀ and dp = dO vᵀ (both from shared memory), p = exp2(s * scale - lse) from the
forward's log-sum-exp, ds = p * (dp - delta), and dq += ds k with ds from registers. Pipelined
by one step: a step's two score products are issued in one turn with the last step's ds k, so
the elementwise work runs while ds k does.

Each consumer also writes ``delta = rowsum(dO * O)`` for its rows (it holds dO; the dk/dv
kernel reads delta after). Calls it cannot take run the Triton dq kernel (:mod:`kernels.bwd`).
"""

from __future__ import annotations

import torch

from .common import LOG2E, qk_scale, tile_plan, tma_compatible
from .fwd_ws import BLOCK_M, BOX_N, GLUON, MAX_REGS, _descriptor, _sm_count, work_items
from .fwd_ws import refusal as forward_refusal
from .layout import BlockLayout

if GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from .fwd_ws import (
        _copy_tile,
        _read_item,
        _reinterpret,
        _step_keep,
        _take_turn,
        _tma_load,
        _work_item,
    )
    from .ws_mma import _issue_transposed

# Shared memory a program may take on Hopper (227 KB), for the stage rule below.
SHARED_LIMIT = 232448


def shared_bytes(head_dim: int, block_n: int, stages: int) -> int:
    """Shared memory of the kernel: the q and dO tiles (128 rows each) and ``stages`` k and v
    tiles of ``block_n`` keys, 16-bit, with a little for the barriers."""
    return 2 * BLOCK_M * head_dim * 2 + stages * 2 * block_n * head_dim * 2 + 1024


if GLUON:
    @gluon.jit
    def _load_partition(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_boxes, v_boxes,
                        q_ready, q_empty, k_ready, v_ready, kv_empty, Items, Starts, KvBlock,
                        n_tiles, first_tile, num_heads, q_per_kv, q_offset,
                        BLOCK_M: gl.constexpr, BLOCK_SIZE: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Loader warp: each work item's q and dO tiles (once both consumers are done with the
        last item's), then its k and v tiles through the stages."""
        stages: gl.constexpr = k_ready.shape[0]
        BOX_N: gl.constexpr = k_desc.block_type.shape[2]
        chunks: gl.constexpr = HEAD_DIM // k_desc.block_type.shape[3]
        boxes: gl.constexpr = k_boxes.shape[0] // (stages * chunks)
        n_sub: gl.constexpr = BLOCK_SIZE // BOX_N
        g = 0  # kv steps issued so far by this program: the ring position
        i = 0  # work items so far: the q buffer's phase
        pid = gl.program_id(0)
        for slot in range(gl.load(Starts + pid), gl.load(Starts + pid + 1)):
            w, first_entry, n_entries, _, _ = _read_item(Items, slot)
            tile, _, off_z, off_h, off_kvh = _work_item(w, n_tiles, first_tile, num_heads,
                                                        q_per_kv)
            # Rows before the first query or past the last read zeros.
            mbarrier.wait(q_empty, (i & 1) ^ 1)
            mbarrier.expect(q_ready, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            _tma_load(q_desc, [off_z, off_h, tile * BLOCK_M - q_offset, 0], q_ready, q_smem)
            _tma_load(do_desc, [off_z, off_h, tile * BLOCK_M - q_offset, 0], q_ready, do_smem)
            first_box = first_entry * n_sub
            n_boxes = n_entries * n_sub
            steps = gl.maximum(gl.cdiv(n_boxes, boxes), 1)
            for j in range(0, steps):
                s = (g + j) % stages
                # Barriers start in the completed phase: the first pass over the stages runs free.
                mbarrier.wait(kv_empty.index(s), (((g + j) // stages) & 1) ^ 1)
                _copy_tile(k_desc, k_boxes, k_ready.index(s), s, j, KvBlock, first_box, n_boxes,
                           off_z, off_kvh, BLOCK_SIZE, HEAD_DIM, stages)
                _copy_tile(v_desc, v_boxes, v_ready.index(s), s, j, KvBlock, first_box, n_boxes,
                           off_z, off_kvh, BLOCK_SIZE, HEAD_DIM, stages)
            g += steps
            i += 1

    @gluon.jit
    def _issue_dq(ds, acc, k_bufs, j):
        """Start acc += ds k over step ``j``'s k tile (already waited for; not waited for)."""
        stages: gl.constexpr = k_bufs.shape[0]
        return warpgroup_mma(ds, k_bufs.index(j % stages), acc, is_async=True)

    @gluon.jit
    def _grad_scores(s, dp, lse, delta, j, masked, first_box, n_boxes, KvBlock, RowBits,
                     offs_m_abs, tile_first_block, row_end, seq_k, qk_scale,
                     BOX_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, SUB_BLOCKS: gl.constexpr,
                     IS_CAUSAL: gl.constexpr, s_layout: gl.constexpr, ds_layout: gl.constexpr,
                     DTYPE: gl.constexpr):
        """ds = p * (dp - delta) of step ``j``, with p recomputed from the scores and the
        forward's log-sum-exp (log2 units), masked when ``masked``; 16-bit, as the ds k
        operand."""
        TILE_N: gl.constexpr = s.shape[1]
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
        if masked:
            keep = _step_keep(j, first_box, n_boxes, KvBlock, RowBits, offs_m_abs,
                              tile_first_block, row_end, seq_k, TILE_N, BOX_N, BLOCK_SIZE,
                              SUB_BLOCKS, IS_CAUSAL, s_layout)
            p = gl.where(keep, p, 0.0)
        ds = p * (dp - gl.expand_dims(delta, 1))
        return gl.convert_layout(ds.to(DTYPE), ds_layout)

    @gluon.jit
    def _row_delta(do_half, Out, off_z, off_h, offs_m, row_ok, stride_oz, stride_oh, stride_om,
                   stride_ok, HEAD_DIM: gl.constexpr, layout: gl.constexpr):
        """``rowsum(dO * O)`` (fp32) of the consumer's rows, dO from its shared-memory tile."""
        do = do_half.load(layout).to(gl.float32)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        o_base = off_z.to(gl.int64) * stride_oz + off_h.to(gl.int64) * stride_oh
        o_ptrs = (Out + o_base + gl.expand_dims(offs_m.to(gl.int64) * stride_om, 1)
                  + gl.expand_dims(offs_d * stride_ok, 0))
        o = gl.load(o_ptrs, mask=gl.expand_dims(row_ok, 1), other=0.0).to(gl.float32)
        return gl.sum(o * do, axis=1)

    @gluon.jit
    def _dq_partition(q_smem, do_smem, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready,
                      kv_empty, turns, Items, Starts, KvBlock, RowBits, Out, DQ, Lse, Delta,
                      stride_oz, stride_oh, stride_om, stride_ok,
                      stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                      n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale, sm_scale,
                      BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                      BOX_N: gl.constexpr, IS_CAUSAL: gl.constexpr, HALF: gl.constexpr):
        """One consumer warp group: rows ``HALF * BLOCK_M / 2`` on of each work item's tile,
        through the row's steps, then dq's store. Step j+1's q kᵀ and dO vᵀ are issued in one
        turn with step j's ds k."""
        NUM_WARPS: gl.constexpr = 4
        ROWS: gl.constexpr = BLOCK_M // 2
        SUB_BLOCKS: gl.constexpr = BLOCK_M // BLOCK_SIZE if BLOCK_M > BLOCK_SIZE else 1
        TILE_N: gl.constexpr = k_bufs.shape[1]
        BOXES: gl.constexpr = TILE_N // BOX_N
        n_sub: gl.constexpr = BLOCK_SIZE // BOX_N
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
            w, first_entry, n_entries, n_front, split = _read_item(Items, slot)
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
            first_box = first_entry * n_sub
            n_boxes = n_entries * n_sub
            # A split item's first step (fwd_ws.split_first_steps) holds two masked blocks,
            # counted among the row's leading entries: it is masked here whole.
            full_boxes = n_front * n_sub
            steps = gl.maximum(gl.cdiv(n_boxes, BOXES), 1)
            acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)

            mbarrier.wait(q_ready, i & 1)
            offs_m_r = row0 - q_offset + gl.arange(0, ROWS, layout=gl.SliceLayout(1, row_layout))
            row_ok_r = (offs_m_r >= 0) & (offs_m_r < seq_q)
            delta_r = _row_delta(do_op, Out, off_z, off_h, offs_m_r, row_ok_r, stride_oz,
                                 stride_oh, stride_om, stride_ok, HEAD_DIM, row_layout)
            gl.store(Delta + stat_base + offs_m_r, delta_r, mask=row_ok_r)
            delta = gl.convert_layout(delta_r, gl.SliceLayout(1, s_layout))

            _take_turn(turns, turn, HALF)
            s = _issue_transposed(q_op, k_bufs, k_ready, g, s_layout)
            dp = _issue_transposed(do_op, v_bufs, v_ready, g, s_layout)
            mbarrier.arrive(turns.index(1 - HALF), count=1)
            s = warpgroup_mma_wait(1, deps=(s,))
            dp = warpgroup_mma_wait(0, deps=(dp,))
            ds = _grad_scores(s, dp, lse, delta, 0, (BOXES > full_boxes) | (split != 0),
                              first_box, n_boxes, KvBlock, RowBits, offs_m_abs, tile_first_block,
                              row_end, seq_k, qk_scale, BOX_N, BLOCK_SIZE, SUB_BLOCKS, IS_CAUSAL,
                              s_layout, ds_layout, DTYPE)
            for j in range(1, steps):
                _take_turn(turns, turn + j, HALF)
                s = _issue_transposed(q_op, k_bufs, k_ready, g + j, s_layout)
                dp = _issue_transposed(do_op, v_bufs, v_ready, g + j, s_layout)
                acc = _issue_dq(ds, acc, k_bufs, g + j - 1)
                mbarrier.arrive(turns.index(1 - HALF), count=1)
                # wgmma groups retire in order: s first, then dp, then the last step's ds k.
                s = warpgroup_mma_wait(2, deps=(s,))
                dp = warpgroup_mma_wait(1, deps=(dp,))
                ds_next = _grad_scores(s, dp, lse, delta, j, (j + 1) * BOXES > full_boxes,
                                       first_box, n_boxes, KvBlock, RowBits, offs_m_abs,
                                       tile_first_block, row_end, seq_k, qk_scale, BOX_N,
                                       BLOCK_SIZE, SUB_BLOCKS, IS_CAUSAL, s_layout, ds_layout,
                                       DTYPE)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(kv_empty.index((g + j - 1) % stages), count=1)
                ds = ds_next
            mbarrier.arrive(q_empty, count=1)  # every product reading q and dO is done
            _take_turn(turns, turn + steps, HALF)
            acc = _issue_dq(ds, acc, k_bufs, g + steps - 1)
            mbarrier.arrive(turns.index(1 - HALF), count=1)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(kv_empty.index((g + steps - 1) % stages), count=1)

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
            turn += steps + 1
            i += 1

    @gluon.jit
    def _bwd_dq_ws(q_desc, do_desc, k_desc, v_desc, Out, DQ, Lse, Delta, Items, Starts, KvBlock,
                   RowBits,
                   stride_oz, stride_oh, stride_om, stride_ok,
                   stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                   num_heads, q_per_kv, seq_q, seq_k, n_tiles, first_tile, qk_scale, sm_scale,
                   BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                   IS_CAUSAL: gl.constexpr, BOXES: gl.constexpr, STAGES: gl.constexpr):
        """Persistent: program ``p`` takes the work items in rows ``Starts[p]:Starts[p+1]`` of
        ``Items`` (:func:`kernels.fwd_ws.work_items`)."""
        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, do_desc.block_type.shape,
                                            do_desc.layout)
        BOX_N: gl.constexpr = k_desc.block_type.shape[2]
        BOX_D: gl.constexpr = k_desc.block_type.shape[3]
        # The stages as in the Gluon forward: 128-byte column chunks filled one box at a time,
        # read as one (BOXES * BOX_N, dim) tile.
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
        mbarrier.init(q_empty, count=2)  # both consumers release the q and dO tiles
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a stage
        for i in gl.static_range(2):
            mbarrier.init(turns.index(i), count=1)
        q_tile = q_smem.reshape([BLOCK_M, HEAD_DIM])
        do_tile = do_smem.reshape([BLOCK_M, HEAD_DIM])

        # Constexprs written into each partition's tuple (a tuple variable would make them
        # runtime values).
        gl.warp_specialize([
            (_dq_partition, (q_tile, do_tile, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready,
                             kv_empty, turns, Items, Starts, KvBlock, RowBits, Out, DQ, Lse,
                             Delta, stride_oz, stride_oh, stride_om, stride_ok,
                             stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                             n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale,
                             sm_scale, BLOCK_M, HEAD_DIM, BLOCK_SIZE, BOX_N, IS_CAUSAL, 0)),
            (_dq_partition, (q_tile, do_tile, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready,
                             kv_empty, turns, Items, Starts, KvBlock, RowBits, Out, DQ, Lse,
                             Delta, stride_oz, stride_oh, stride_om, stride_ok,
                             stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                             n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale,
                             sm_scale, BLOCK_M, HEAD_DIM, BLOCK_SIZE, BOX_N, IS_CAUSAL, 1)),
            (_load_partition, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_boxes,
                               v_boxes, q_ready, q_empty, k_ready, v_ready, kv_empty, Items,
                               Starts, KvBlock, n_tiles, first_tile, num_heads, q_per_kv,
                               seq_k - seq_q, BLOCK_M, BLOCK_SIZE, HEAD_DIM)),
        ], [4, 1], [240, 24])  # registers a thread: see fwd_ws.MAX_REGS


def sparse_attention_dq_ws(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                           dq: torch.Tensor, layout: BlockLayout, sm_scale: float,
                           stages: int, boxes: int) -> None:
    """dq into ``dq`` and ``delta = rowsum(dO * O)`` into ``delta`` for a call
    :func:`kernels.fwd_ws.eligible` accepts (the same tensor-memory rules, and dO's strides
    too): ``boxes`` 64-key copies per step (a config's ``block_n // 64``), ``stages`` steps
    in flight."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    plan = tile_plan(layout, BLOCK_M, seq_k)
    first_tile = (seq_k - seq_q) // BLOCK_M
    work = work_items(layout, seq_k, first_tile, batch, heads, boxes, _sm_count(q.device),
                      q.device)
    box_d = 128 // q.element_size()  # one 128-byte swizzle span of columns per k/v copy
    _bwd_dq_ws[(len(work.starts) - 1,)](
        _descriptor(q, BLOCK_M, head_dim), _descriptor(do, BLOCK_M, head_dim),
        _descriptor(k, BOX_N, box_d), _descriptor(v, BOX_N, box_d), out, dq, lse, delta,
        work.items, work.starts, work.kv_block, work.row_bits, *out.stride(), *dq.stride(),
        heads, heads // kv_heads, seq_q, seq_k, plan.tiles - first_tile, first_tile,
        qk_scale(sm_scale), sm_scale,
        BLOCK_M=BLOCK_M, HEAD_DIM=head_dim, BLOCK_SIZE=layout.block_size,
        IS_CAUSAL=layout.causal, BOXES=boxes, STAGES=stages, num_warps=4, maxnreg=MAX_REGS,
    )


def refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
            do: torch.Tensor, tma: bool = True) -> str | None:
    """Why this kernel cannot take the call (None: it can): the Gluon forward's reasons
    (:func:`kernels.fwd_ws.refusal`), or dO's strides; the Triton dq kernel takes the rest."""
    why = forward_refusal(q, k, v, layout, tma)
    if why is None and not tma_compatible(do):
        why = "impl='gluon' needs dO in strides tensor-memory copies can read"
    return why
