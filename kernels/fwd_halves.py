"""The Gluon forward (:mod:`kernels.fwd_ws`) on owned steps (:mod:`kernels.halves_plan`): each
half of a 128-row tile multiplies only the kv blocks its own rows keep.

The loader warp, the copies, the masks and the softmax step are :mod:`kernels.fwd_ws`'s; what
is new is the consumer, which walks its own half's list of steps: a step of the other half's
is passed (its stage released once its k tile has landed), the k-th steps of the two halves
share a turn at the tensor cores (ping-pong) for as many steps as the shorter list has, and a
consumer issues its last p v as soon as its own steps end. The dispatch
(:func:`kernels.halves_plan.halves_pay`) takes this kernel where the pattern's tile halves keep
different blocks enough for it to pay: never for phi-3's pattern.
"""

from __future__ import annotations

import math

import torch

from . import buffers
from .common import LN2, qk_scale, tma_compatible
from .fwd_ws import BLOCK_M, BOX_N, GLUON, MAX_REGS, _descriptor, _sm_count
from .halves_plan import BOX_CHOICES, MIN_STAGES, halves_items
from .layout import BlockLayout

if GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma_wait,
    )

    from .fwd_ws import (
        _copy_out,
        _issue_pv,
        _issue_scores,
        _load_partition,
        _read_item,
        _reinterpret,
        _softmax_step,
        _stage_keys,
        _work_item,
    )

    @gluon.jit
    def _take_turn_if(turns, n, HALF: gl.constexpr, pred):
        """fwd_ws._take_turn where ``pred`` holds; else go on at once."""
        mbarrier.wait(turns.index(HALF), (n & 1) ^ (1 - HALF), pred=pred)

    @gluon.jit
    def _skip_step(k_ready, kv_empty, j, last_step):
        """Pass step ``j``, which the other half owns: release its stage once its k tile has
        landed (so the release counts for this filling of it), except at ``last_step``, whose
        stage holds the output later (-1: release every one)."""
        stages: gl.constexpr = k_ready.shape[0]
        mbarrier.wait(k_ready.index(j % stages), (j // stages) & 1)
        if j != last_step:
            mbarrier.arrive(kv_empty.index(j % stages), count=1)

    @gluon.jit
    def _owned_step(p, acc, m_i, l_i, j, prev, g, turn, has_turn, q_op, k_bufs, v_bufs,
                    k_ready, v_ready, kv_empty, turns, first_box, n_boxes, full_boxes, KvBlock,
                    RowBits, offs_m_abs, tile_first_block, row_end, seq_k, qk_scale,
                    BOX_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, SUB_BLOCKS: gl.constexpr,
                    IS_CAUSAL: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                    p_layout: gl.constexpr, HALF: gl.constexpr):
        """Step ``j`` (item-relative) after this half's first: in turn ``turn`` if it
        ``has_turn``, start its q kᵀ and the p v of this half's last step ``prev``; the softmax
        runs while p v does; then ``prev``'s stage is released and the accumulator rescaled
        (fwd_ws._next_step, with the last step not always the one before)."""
        stages: gl.constexpr = k_bufs.shape[0]
        TILE_N: gl.constexpr = k_bufs.shape[1]
        _take_turn_if(turns, turn, HALF, has_turn)
        qk = _issue_scores(q_op, k_bufs, k_ready, g + j, s_layout, 0, TILE_N)
        acc = _issue_pv(p, acc, v_bufs, v_ready, g + prev, 0)
        mbarrier.arrive(turns.index(1 - HALF), count=1, pred=has_turn)
        qk = warpgroup_mma_wait(1, deps=(qk,))
        p, m_i, l_i, alpha = _softmax_step(
            qk, m_i, l_i, j, first_box, n_boxes, full_boxes, KvBlock, RowBits, offs_m_abs,
            tile_first_block, row_end, seq_k, qk_scale, TILE_N, BOX_N, BLOCK_SIZE, SUB_BLOCKS,
            IS_CAUSAL, s_layout, p_layout, q_op.dtype)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index((g + prev) % stages), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        return p, m_i, l_i, acc

    @gluon.jit
    def _halves_partition(q_smem, k_bufs, v_bufs, k_boxes, o_desc, q_ready, q_empty, k_ready,
                          v_ready, kv_empty, turns, Items, Starts, KvBlock, RowBits, Steps, Out,
                          Lse, stride_oz, stride_oh, stride_om, stride_ok,
                          n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale,
                          BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                          BLOCK_SIZE: gl.constexpr, BOX_N: gl.constexpr,
                          IS_CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr,
                          TMA_STORE: gl.constexpr, HALF: gl.constexpr):
        """One consumer warp group: rows ``HALF * 64`` on of each item's tile, through the steps
        its half owns (fwd_ws._softmax_partition's pipeline over them). Turns: the k-th step of
        each half shares the item's k-th turn (the upper half first), for as many steps as the
        half with fewer has; the other half's further steps and the last p v take none. Each
        consumer takes that many turns an item, so the turns stay paired across items; they
        order the issue only, never the data."""
        NUM_WARPS: gl.constexpr = 4
        ROWS: gl.constexpr = BLOCK_M // 2
        SUB_BLOCKS: gl.constexpr = BLOCK_M // BLOCK_SIZE
        TILE_N: gl.constexpr = k_bufs.shape[1]
        stages: gl.constexpr = k_bufs.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, TILE_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        P_DTYPE: gl.constexpr = q_smem.dtype
        q_op = q_smem.slice(HALF * ROWS, ROWS)
        q_offset = seq_k - seq_q
        g = 0  # kv steps consumed so far by this program: the ring position
        i = 0  # work items so far: the q buffer's phase
        turn = 0  # turns taken so far
        pid = gl.program_id(0)
        first_slot = gl.load(Starts + pid)
        last_slot = gl.load(Starts + pid + 1)
        next_item = _read_item(Items, first_slot)
        for slot in range(first_slot, last_slot):
            w, first_entry, n_entries, step_word, _unused = next_item
            next_item = _read_item(Items, gl.minimum(slot + 1, last_slot - 1))
            tile, off_zh, off_z, off_h, off_kvh = _work_item(w, n_tiles, first_tile, num_heads,
                                                             q_per_kv)
            row0 = tile * BLOCK_M + HALF * ROWS
            offs_m_abs = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            m_i = gl.full([ROWS], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
            acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
            tile_first_block = tile * BLOCK_M // BLOCK_SIZE
            if IS_CAUSAL:
                row_end = gl.minimum((tile + 1) * BLOCK_M, seq_k)
            else:
                row_end = seq_k
            steps = n_entries // (TILE_N // BOX_N)  # the plan pads a row to whole steps
            # This half's steps: (item-relative step << 1) | needs a mask, each one or two
            # after the one before (build_halves_plan).
            own = Steps + step_word + gl.load(Steps + step_word + 2 * HALF)
            n_own = gl.load(Steps + step_word + 2 * HALF + 1)
            turns_here = gl.minimum(gl.load(Steps + step_word + 1), gl.load(Steps + step_word + 3))
            last_step = g + steps - 1
            last_own = -1

            mbarrier.wait(q_ready, i & 1)
            if n_own > 0:
                word = gl.load(own)
                prev = word >> 1
                for j in range(0, prev):
                    _skip_step(k_ready, kv_empty, g + j, last_step)
                # This half's first step: the accumulator is still zero, so no p v and no
                # rescale.
                _take_turn_if(turns, turn, HALF, turns_here > 0)
                qk = _issue_scores(q_op, k_bufs, k_ready, g + prev, s_layout, 0, TILE_N)
                mbarrier.arrive(turns.index(1 - HALF), count=1, pred=turns_here > 0)
                qk = warpgroup_mma_wait(0, deps=(qk,))
                p, m_i, l_i, _alpha0 = _softmax_step(
                    qk, m_i, l_i, prev, first_entry, n_entries, n_entries * (1 - (word & 1)),
                    KvBlock, RowBits, offs_m_abs, tile_first_block, row_end, seq_k, qk_scale,
                    TILE_N, BOX_N, BLOCK_SIZE, SUB_BLOCKS, IS_CAUSAL, s_layout, p_layout,
                    P_DTYPE)
                for n in range(1, n_own):
                    word = gl.load(own + n)
                    j = word >> 1
                    if j - prev == 2:  # the other half's step between two of this half's
                        _skip_step(k_ready, kv_empty, g + prev + 1, last_step)
                    p, m_i, l_i, acc = _owned_step(
                        p, acc, m_i, l_i, j, prev, g, turn + n, n < turns_here, q_op, k_bufs,
                        v_bufs, k_ready, v_ready, kv_empty, turns, first_entry, n_entries,
                        n_entries * (1 - (word & 1)), KvBlock, RowBits, offs_m_abs,
                        tile_first_block, row_end, seq_k, qk_scale, BOX_N, BLOCK_SIZE,
                        SUB_BLOCKS, IS_CAUSAL, s_layout, o_layout, p_layout, HALF)
                    prev = j
                mbarrier.arrive(q_empty, count=1)  # every q kᵀ of this half is done
                acc = _issue_pv(p, acc, v_bufs, v_ready, g + prev, 0)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                if g + prev != last_step:
                    mbarrier.arrive(kv_empty.index((g + prev) % stages), count=1)
                last_own = prev
            else:
                mbarrier.arrive(q_empty, count=1)  # this half multiplies nothing in this item
            for j in range(last_own + 1, steps):
                _skip_step(k_ready, kv_empty, g + j, last_step)
            last = last_step % stages

            # -- epilogue (fwd_ws's) --
            l_safe = gl.where(l_i == 0.0, 1.0, l_i)
            l_o = gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))
            out = acc / gl.expand_dims(l_o, 1)
            if TMA_STORE:
                # Staged in the item's last k tile, which both halves hold until here (the
                # half that did not multiply it kept it from the loader too).
                mbarrier.wait(q_empty, i & 1)
                _stage_keys(k_bufs, last, HALF * ROWS, ROWS).store(out.to(P_DTYPE))
                fence_async_shared()
                _copy_out(o_desc, k_boxes, last, off_z, off_h, row0 - q_offset, HALF, HEAD_DIM,
                          stages)
                tma.store_wait(0)
                mbarrier.arrive(kv_empty.index(last), count=1)
            else:
                mbarrier.arrive(kv_empty.index(last), count=1)
                offs_m = row0 - q_offset + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
                offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
                row_ok = (offs_m >= 0) & (offs_m < seq_q)
                o_base = off_z.to(gl.int64) * stride_oz + off_h.to(gl.int64) * stride_oh
                o_ptrs = (Out + o_base + gl.expand_dims(offs_m.to(gl.int64) * stride_om, 1)
                          + gl.expand_dims(offs_d * stride_ok, 0))
                gl.store(o_ptrs, out.to(Out.dtype.element_ty),
                         mask=gl.expand_dims(row_ok, 1) & gl.expand_dims(offs_d < HEAD_DIM, 0))
            g += steps
            turn += turns_here
            i += 1
            if RETURN_LSE:
                lse = (m_i + gl.log2(l_safe)) * LN2  # natural log; m_i is in log2 units
                offs_m_s = offs_m_abs - q_offset
                gl.store(Lse + off_zh.to(gl.int64) * seq_q + offs_m_s, lse,
                         mask=(offs_m_s >= 0) & (offs_m_s < seq_q))

    @gluon.jit
    def _sparse_attn_fwd_halves(q_desc, k_desc, v_desc, o_desc, Out, Lse, Items, Starts, KvBlock,
                                RowBits, Steps, stride_oz, stride_oh, stride_om, stride_ok,
                                num_heads, q_per_kv, seq_q, seq_k, n_tiles, first_tile, qk_scale,
                                BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                                BLOCK_SIZE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                                RETURN_LSE: gl.constexpr, BOXES: gl.constexpr,
                                STAGES: gl.constexpr, TMA_STORE: gl.constexpr):
        """Persistent, as fwd_ws._sparse_attn_fwd_ws, over
        :func:`kernels.halves_plan.halves_items`' work."""
        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
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

        gl.warp_specialize([
            (_halves_partition, (q_tile, k_bufs, v_bufs, k_boxes, o_desc, q_ready, q_empty,
                                 k_ready, v_ready, kv_empty, turns, Items, Starts, KvBlock,
                                 RowBits, Steps, Out, Lse,
                                 stride_oz, stride_oh, stride_om, stride_ok,
                                 n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale,
                                 BLOCK_M, HEAD_DIM, BLOCK_SIZE, BOX_N, IS_CAUSAL, RETURN_LSE,
                                 TMA_STORE, 0)),
            (_halves_partition, (q_tile, k_bufs, v_bufs, k_boxes, o_desc, q_ready, q_empty,
                                 k_ready, v_ready, kv_empty, turns, Items, Starts, KvBlock,
                                 RowBits, Steps, Out, Lse,
                                 stride_oz, stride_oh, stride_om, stride_ok,
                                 n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale,
                                 BLOCK_M, HEAD_DIM, BLOCK_SIZE, BOX_N, IS_CAUSAL, RETURN_LSE,
                                 TMA_STORE, 1)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_boxes, v_boxes, q_ready,
                               q_empty, k_ready, v_ready, kv_empty, Items, Starts, KvBlock,
                               n_tiles, first_tile, num_heads, q_per_kv, seq_k - seq_q,
                               BLOCK_M, BLOCK_SIZE, HEAD_DIM)),
        ], [4, 1], [240, 24])  # registers a thread: see fwd_ws.MAX_REGS


def sparse_attention_fwd_halves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                layout: BlockLayout, sm_scale: float, return_lse: bool = True,
                                out: torch.Tensor | None = None, stages: int = 3, boxes: int = 2
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`kernels.fwd_ws.sparse_attention_fwd_ws` on owned steps, for calls that kernel
    takes with 64-key blocks: ``boxes`` 64-key copies a step, ``stages`` steps in flight (at
    least three)."""
    if stages < MIN_STAGES or boxes not in BOX_CHOICES:
        raise ValueError(f"owned steps need {MIN_STAGES} stages or more and 1 or 2 boxes a "
                         f"step, got {stages} stages and {boxes} boxes")
    if layout.block_size != BOX_N:
        raise ValueError(f"owned steps need {BOX_N}-key sparse blocks, got {layout.block_size}")
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if out is None:
        out = buffers.new_output((batch, seq_q, heads, head_dim), q, q.dtype).transpose(1, 2)
    lse = buffers.new_output((batch, heads, seq_q) if return_lse else (1,), q, torch.float32)
    first_tile = (seq_k - seq_q) // BLOCK_M
    work = halves_items(layout, seq_k, first_tile, batch, heads, boxes, _sm_count(q.device),
                        q.device)
    n_tiles = math.ceil(seq_k / BLOCK_M) - first_tile
    grid = (len(work.starts) - 1,)
    box_d = 128 // q.element_size()
    # The output is staged in the last k tile's two 64-key boxes, one per consumer.
    tma_store = (boxes == 2 and (seq_k - seq_q) % BLOCK_M == 0 and out.dtype == q.dtype
                 and tma_compatible(out))
    _sparse_attn_fwd_halves[grid](
        _descriptor(q, BLOCK_M, head_dim), _descriptor(k, BOX_N, box_d),
        _descriptor(v, BOX_N, box_d), _descriptor(out if tma_store else k, BOX_N, box_d), out, lse,
        work.items, work.starts, work.kv_block, work.row_bits, work.steps, *out.stride(),
        heads, heads // kv_heads, seq_q, seq_k, n_tiles, first_tile, qk_scale(sm_scale),
        BLOCK_M=BLOCK_M, HEAD_DIM=head_dim, BLOCK_SIZE=layout.block_size,
        IS_CAUSAL=layout.causal, RETURN_LSE=return_lse, BOXES=boxes, STAGES=stages,
        TMA_STORE=tma_store,
        num_warps=4, maxnreg=MAX_REGS,
    )
    return out, (lse if return_lse else None)

