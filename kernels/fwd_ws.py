"""Warp-specialised forward kernel for Hopper, written in Gluon (configs with ``impl="gluon"``).

The same tile plan and arithmetic as :mod:`kernels.fwd`, split across warps by job. A loader warp
streams kv tiles into a ring of shared-memory stages with tensor-memory copies of 64 keys each,
so one 128-key tile can hold two kept blocks that are not adjacent. Two consumer warp groups own
64 query rows each of a 128-row tile; each overlaps its softmax with its own next q kᵀ and last
p v, and they take turns issuing to the tensor cores (ping-pong), so one's softmax runs while
the other's products keep the tensor cores busy. Persistent: one program per SM, each with a
balanced share of the work items (:mod:`kernels.schedule`). Where a 128-row tile keeps one block
only for its upper 64 rows and another only for its lower 64 (phi-3's first local block and its
diagonal), the two share the item's first step and each consumer multiplies only its own 64 keys.
Calls it cannot take (not Hopper, 32-bit,
head_dim other than 64 or 128, strides tensor-memory copies refuse) run :mod:`kernels.fwd`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from . import buffers
from .common import (
    LN2,
    TilePlan,
    _online_softmax,
    qk_scale,
    tile_plan,
    tma_compatible,
)
from .layout import BlockLayout
from .schedule import balanced_schedule

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import _unwrap_if_constexpr, builtin
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import (
        TensorDescriptor as GluonDescriptor,
    )
    # The copy is tma.async_load from triton 3.7 on; 3.6 names it async_copy_global_to_shared.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    GLUON = True
except ImportError:  # a triton without Gluon: the Triton kernel serves every call
    GLUON = False

BLOCK_M = 128
BOX_N = 64  # keys per tensor-memory copy; a step's kv tile is ``boxes`` of them side by side
# Two 4-warp consumers and a loader warp (a warp group of registers): 12 warps at 168 registers
# a thread fill the register file; the consumers get 240 each, the loader 24.
MAX_REGS = 168
# A work item's fixed cost in kv steps, for balancing the persistent programs' work: the phi-3
# forward's time per program fits (steps + 2.5 per item) at both 8k (11.3 steps an item) and
# 64k (39.7) on the H100 (kernels/PERF.md).
ITEM_OVERHEAD = 2.5
# Columns of the work table: item, first tile-plan entry, entries, leading unmasked entries, split
# (a constexpr so the kernel can read it).
ITEM_COLUMNS = triton.language.constexpr(5)


if GLUON:
    @builtin
    def _reinterpret(desc, dtype, shape, layout, _semantic=None):
        """``desc``'s bytes seen with another shape and layout (the shared-memory method is
        ``reinterpret`` from triton 3.7 on and ``_reinterpret`` before, so call the op directly)."""
        return _semantic.memdesc_reinterpret(desc, _unwrap_if_constexpr(dtype),
                                             [_unwrap_if_constexpr(n) for n in shape],
                                             _unwrap_if_constexpr(layout))

    @gluon.jit
    def _box_start(KvBlock, first_box, b, n_boxes, BLOCK_SIZE: gl.constexpr, BOX_N: gl.constexpr):
        """First key of the row's ``b``-th box (scalar or vector ``b``). Boxes past the row's end
        (the odd half of its last step, or the placeholder step of an empty row) read keys from
        block 0: valid memory whose scores the consumers mask."""
        n_sub: gl.constexpr = BLOCK_SIZE // BOX_N
        box = first_box + b
        block = gl.load(KvBlock + box // n_sub, mask=b < n_boxes, other=0)
        return block * BLOCK_SIZE + (box % n_sub) * BOX_N

    @gluon.jit
    def _copy_tile(desc, boxes_buf, ready, s, j, KvBlock, first_box, n_boxes, desc_z, desc_h,
                   BLOCK_SIZE: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        """Copy step ``j``'s k (or v) tile into stage ``s``: one copy per (64 keys, column chunk),
        all signalling ``ready``."""
        BOX_N: gl.constexpr = desc.block_type.shape[2]
        BOX_D: gl.constexpr = desc.block_type.shape[3]
        chunks: gl.constexpr = HEAD_DIM // BOX_D
        boxes: gl.constexpr = boxes_buf.shape[0] // (STAGES * chunks)
        mbarrier.expect(ready, boxes * chunks * desc.block_type.nbytes)
        for h in gl.static_range(boxes):
            start_n = _box_start(KvBlock, first_box, j * boxes + h, n_boxes, BLOCK_SIZE, BOX_N)
            for c in gl.static_range(chunks):
                # Box (h, c) is keys h*BOX_N.. of column chunk c of the stage's tile.
                _tma_load(desc, [desc_z, desc_h, start_n, c * BOX_D], ready,
                          boxes_buf.index((s * chunks + c) * boxes + h))

    @gluon.jit
    def _copy_out(o_desc, k_boxes, s, off_z, off_h, first_row, HALF: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        """Copy one consumer's output rows, staged in its half of stage ``s``'s k tile, to
        rows ``first_row`` on of ``o_desc`` (rows outside the tensor are not written)."""
        BOX_D: gl.constexpr = o_desc.block_type.shape[3]
        chunks: gl.constexpr = HEAD_DIM // BOX_D
        boxes: gl.constexpr = k_boxes.shape[0] // (STAGES * chunks)
        for c in gl.static_range(chunks):
            # The box _copy_tile filled with keys HALF * BOX_N on of column chunk c.
            _tma_store(o_desc, [off_z, off_h, first_row, c * BOX_D],
                       k_boxes.index((s * chunks + c) * boxes + HALF))

    @gluon.jit
    def _work_item(w, n_tiles, first_tile, num_heads, q_per_kv):
        """Work item ``w`` (query tiles fastest, then batch x head): its tile, batch x head,
        batch, head and kv head."""
        tile = w % n_tiles + first_tile
        off_zh = w // n_tiles
        off_h = off_zh % num_heads
        return tile, off_zh, off_zh // num_heads, off_h, off_h // q_per_kv

    @gluon.jit
    def _read_item(Items, slot):
        """Row ``slot`` of the work table: item number, first tile-plan entry, entries, leading
        entries no step masks, and whether the first step is split (see :func:`work_items`)."""
        row = Items + ITEM_COLUMNS * slot
        return gl.load(row), gl.load(row + 1), gl.load(row + 2), gl.load(row + 3), gl.load(row + 4)

    @gluon.jit
    def _load_partition(q_desc, k_desc, v_desc, q_smem, k_boxes, v_boxes, q_ready, q_empty,
                        k_ready, v_ready, kv_empty, Items, Starts, KvBlock, n_tiles,
                        first_tile, num_heads, q_per_kv, q_offset,
                        BLOCK_M: gl.constexpr, BLOCK_SIZE: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Loader warp: for each of this program's work items, its q tile (once the consumers
        are done multiplying the last one) and its k and v tiles through the stages."""
        stages: gl.constexpr = k_ready.shape[0]
        BOX_N: gl.constexpr = k_desc.block_type.shape[2]
        boxes: gl.constexpr = k_boxes.shape[0] // (stages * (HEAD_DIM // k_desc.block_type.shape[3]))
        n_sub: gl.constexpr = BLOCK_SIZE // BOX_N
        g = 0  # kv steps issued so far by this program: the ring position
        i = 0  # work items so far: the q buffer's phase
        pid = gl.program_id(0)
        for slot in range(gl.load(Starts + pid), gl.load(Starts + pid + 1)):
            w, first_entry, n_entries, _, _ = _read_item(Items, slot)
            tile, _, off_z, off_h, off_kvh = _work_item(w, n_tiles, first_tile, num_heads,
                                                        q_per_kv)
            # q rows before the first query or past the last read zeros.
            mbarrier.wait(q_empty, (i & 1) ^ 1)
            mbarrier.expect(q_ready, q_desc.block_type.nbytes)
            _tma_load(q_desc, [off_z, off_h, tile * BLOCK_M - q_offset, 0], q_ready, q_smem)
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
    def _stage_keys(bufs, s, FIRST_KEY: gl.constexpr, KEYS: gl.constexpr):
        """Keys ``FIRST_KEY:FIRST_KEY + KEYS`` of stage ``s``'s tile (the whole tile unsliced)."""
        if KEYS == bufs.shape[1]:
            keys = bufs.index(s)
        else:
            keys = bufs.index(s).slice(FIRST_KEY, KEYS)
        return keys

    @gluon.jit
    def _issue_scores(q_op, k_bufs, k_ready, j, s_layout: gl.constexpr,
                      FIRST_KEY: gl.constexpr, KEYS: gl.constexpr):
        """Wait for step ``j``'s k tile and start q kᵀ over its keys ``FIRST_KEY`` on
        ``KEYS`` on the tensor cores (not waited for)."""
        stages: gl.constexpr = k_bufs.shape[0]
        # A fresh zero each step: one kept live across the loop would hold a tile of registers.
        rows: gl.constexpr = q_op.shape[0]
        zero = gl.zeros([rows, KEYS], gl.float32, s_layout)
        s = j % stages
        mbarrier.wait(k_ready.index(s), (j // stages) & 1)
        k_tile = _stage_keys(k_bufs, s, FIRST_KEY, KEYS).permute((1, 0))
        return warpgroup_mma(q_op, k_tile, zero, use_acc=False, is_async=True)

    @gluon.jit
    def _issue_pv(p_op, acc, v_bufs, v_ready, j, FIRST_KEY: gl.constexpr):
        """Wait for step ``j``'s v tile and start acc += p v over the tile's keys ``FIRST_KEY``
        on, as many as p has columns (not waited for)."""
        stages: gl.constexpr = v_bufs.shape[0]
        s = j % stages
        mbarrier.wait(v_ready.index(s), (j // stages) & 1)
        v_tile = _stage_keys(v_bufs, s, FIRST_KEY, p_op.shape[1])
        return warpgroup_mma(p_op, v_tile, acc, is_async=True)

    @gluon.jit
    def _step_keep(j, first_box, n_boxes, KvBlock, RowBits, offs_m_abs, tile_first_block,
                   row_end, seq_k, TILE_N: gl.constexpr, BOX_N: gl.constexpr,
                   BLOCK_SIZE: gl.constexpr, SUB_BLOCKS: gl.constexpr, IS_CAUSAL: gl.constexpr,
                   s_layout: gl.constexpr):
        """Which scores of step ``j`` (``TILE_N`` keys from the row's boxes) its rows keep: keys
        in the row and the sequence, causal, and in a block the row's own sub-block keeps.

        common._score_mask with row bits per key (a step's keys may come from two entries).
        Written here: called from Gluon, that helper compiled to the same instructions but, for
        64-key blocks on triton 3.6, to other machine code."""
        n_sub: gl.constexpr = BLOCK_SIZE // BOX_N
        cols = gl.arange(0, TILE_N, layout=gl.SliceLayout(0, s_layout))
        b = j * (TILE_N // BOX_N) + cols // BOX_N
        offs_n = _box_start(KvBlock, first_box, b, n_boxes, BLOCK_SIZE, BOX_N) + cols % BOX_N
        n_ok = (b < n_boxes) & (offs_n < seq_k) & (offs_n < row_end)
        keep = gl.expand_dims(n_ok, 0)
        if IS_CAUSAL:
            keep = keep & (gl.expand_dims(offs_n, 0) <= gl.expand_dims(offs_m_abs, 1))
        if SUB_BLOCKS > 1:
            bits = gl.load(RowBits + (first_box + b) // n_sub, mask=b < n_boxes, other=0)
            shift = offs_m_abs // BLOCK_SIZE - tile_first_block
            keep = keep & (((gl.expand_dims(bits, 0) >> gl.expand_dims(shift, 1)) & 1) != 0)
        return keep

    @gluon.jit
    def _softmax_step(qk, m_i, l_i, j, first_box, n_boxes, full_boxes, KvBlock, RowBits,
                      offs_m_abs, tile_first_block, row_end, seq_k, qk_scale,
                      TILE_N: gl.constexpr, BOX_N: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                      SUB_BLOCKS: gl.constexpr, IS_CAUSAL: gl.constexpr,
                      s_layout: gl.constexpr, p_layout: gl.constexpr, P_DTYPE: gl.constexpr):
        """Mask step ``j``'s scores if any of its boxes needs it, then the online softmax update.

        Returns p (16-bit, laid out as the p v operand), the new max and sum, and the factor
        that rescales the accumulator.
        """
        if (j + 1) * (TILE_N // BOX_N) > full_boxes:
            keep = _step_keep(j, first_box, n_boxes, KvBlock, RowBits, offs_m_abs,
                              tile_first_block, row_end, seq_k, TILE_N, BOX_N, BLOCK_SIZE,
                              SUB_BLOCKS, IS_CAUSAL, s_layout)
            qk = gl.where(keep, qk, float("-inf"))
        p, alpha, m_new, l_i = _online_softmax(qk, m_i, l_i, qk_scale)
        return gl.convert_layout(p.to(P_DTYPE), p_layout), m_new, l_i, alpha

    @gluon.jit
    def _take_turn(turns, n, HALF: gl.constexpr):
        """Wait for this consumer's ``n``-th turn to issue tensor-core work (half 0 goes first)."""
        mbarrier.wait(turns.index(HALF), (n & 1) ^ (1 - HALF))

    @gluon.jit
    def _next_step(p, acc, m_i, l_i, j, g, turn, q_op, k_bufs, v_bufs, k_ready, v_ready, kv_empty,
                   turns, first_box, n_boxes, full_boxes, KvBlock, RowBits, offs_m_abs,
                   tile_first_block, row_end, seq_k, qk_scale,
                   BOX_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, SUB_BLOCKS: gl.constexpr,
                   IS_CAUSAL: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                   p_layout: gl.constexpr, HALF: gl.constexpr, PV_FIRST_KEY: gl.constexpr):
        """Step ``j`` of an item after its first: in one turn, start its q kᵀ and the last
        step's p v (``p`` over that tile's keys ``PV_FIRST_KEY`` on); its softmax runs while
        p v does; then the last stage is released and the accumulator rescaled."""
        stages: gl.constexpr = k_bufs.shape[0]
        TILE_N: gl.constexpr = k_bufs.shape[1]
        _take_turn(turns, turn + j, HALF)
        qk = _issue_scores(q_op, k_bufs, k_ready, g + j, s_layout, 0, TILE_N)
        acc = _issue_pv(p, acc, v_bufs, v_ready, g + j - 1, PV_FIRST_KEY)
        mbarrier.arrive(turns.index(1 - HALF), count=1)
        # wgmma groups retire in order: one left outstanding means q kᵀ is done.
        qk = warpgroup_mma_wait(1, deps=(qk,))
        p, m_i, l_i, alpha = _softmax_step(
            qk, m_i, l_i, j, first_box, n_boxes, full_boxes, KvBlock, RowBits, offs_m_abs,
            tile_first_block, row_end, seq_k, qk_scale, TILE_N, BOX_N, BLOCK_SIZE, SUB_BLOCKS,
            IS_CAUSAL, s_layout, p_layout, q_op.dtype)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index((g + j - 1) % stages), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        return p, m_i, l_i, acc

    @gluon.jit
    def _softmax_partition(q_smem, k_bufs, v_bufs, k_boxes, o_desc, q_ready, q_empty, k_ready,
                           v_ready, kv_empty, turns, Items, Starts, KvBlock, RowBits, Out, Lse,
                           stride_oz, stride_oh, stride_om, stride_ok,
                           n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale,
                           BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                           BLOCK_SIZE: gl.constexpr, BOX_N: gl.constexpr,
                           IS_CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr,
                           TMA_STORE: gl.constexpr, HALF: gl.constexpr):
        """One consumer warp group: for each of this program's work items, rows
        ``HALF * BLOCK_M / 2`` on of its tile, through q kᵀ, the online softmax and p v over the
        row's steps, then the store. q stays in shared memory (read from registers measured
        slower: kernels/PERF.md).

        Software-pipelined by one step: step j+1's q kᵀ and step j's p v run on the tensor
        cores while these warps do step j+1's softmax. The two consumers take turns issuing
        (ping-pong), so one's softmax runs while the other's products keep the tensor cores busy.
        The q tile is released as soon as its last q kᵀ is done, so the next item's q and first
        kv tiles load during this item's last p v and store.
        """
        NUM_WARPS: gl.constexpr = 4
        ROWS: gl.constexpr = BLOCK_M // 2
        SUB_BLOCKS: gl.constexpr = BLOCK_M // BLOCK_SIZE if BLOCK_M > BLOCK_SIZE else 1
        TILE_N: gl.constexpr = k_bufs.shape[1]
        n_sub: gl.constexpr = BLOCK_SIZE // BOX_N
        stages: gl.constexpr = k_bufs.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, TILE_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        # Scores of one 64-key box: the split first step's.
        s_box_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BOX_N, 16])
        P_DTYPE: gl.constexpr = q_smem.dtype
        q_op = q_smem.slice(HALF * ROWS, ROWS)
        q_offset = seq_k - seq_q
        g = 0  # kv steps consumed so far by this program: the ring position
        i = 0  # work items so far: the q buffer's phase
        turn = 0  # turns taken so far
        pid = gl.program_id(0)
        first_slot = gl.load(Starts + pid)
        last_slot = gl.load(Starts + pid + 1)
        # Each item's row of Items is read one item ahead: waiting for it at the item's start
        # cost about 3% at 8k (kernels/PERF.md).
        next_item = _read_item(Items, first_slot)
        for slot in range(first_slot, last_slot):
            w, first_entry, n_entries, n_front, split = next_item
            next_item = _read_item(Items, gl.minimum(slot + 1, last_slot - 1))
            tile, off_zh, off_z, off_h, off_kvh = _work_item(w, n_tiles, first_tile, num_heads,
                                                             q_per_kv)
            row0 = tile * BLOCK_M + HALF * ROWS
            offs_m_abs = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            # A finite floor instead of -inf keeps exp2(m_i - m_new) defined for masked rows.
            m_i = gl.full([ROWS], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
            acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
            tile_first_block = tile * BLOCK_M // BLOCK_SIZE
            if IS_CAUSAL:
                row_end = gl.minimum((tile + 1) * BLOCK_M, seq_k)
            else:
                row_end = seq_k
            first_box = first_entry * n_sub
            n_boxes = n_entries * n_sub
            full_boxes = n_front * n_sub
            steps = gl.maximum(gl.cdiv(n_boxes, TILE_N // BOX_N), 1)

            mbarrier.wait(q_ready, i & 1)
            if split != 0:
                # Step 0 holds a block only this half's rows keep and one only the other half's
                # (work_items puts them there): multiply just this half's 64 keys.
                _take_turn(turns, turn, HALF)
                qk_own = _issue_scores(q_op, k_bufs, k_ready, g, s_box_layout, HALF * BOX_N, BOX_N)
                mbarrier.arrive(turns.index(1 - HALF), count=1)
                qk_own = warpgroup_mma_wait(0, deps=(qk_own,))
                # Box HALF of the item, always masked (full_boxes 0). Row vectors in the box
                # scores' layout, converted back after (the same rows in both layouts).
                box_rows: gl.constexpr = gl.SliceLayout(1, s_box_layout)
                p_own, m_own, l_own, _alpha_own = _softmax_step(
                    qk_own, gl.convert_layout(m_i, box_rows), gl.convert_layout(l_i, box_rows),
                    HALF, first_box, n_boxes, 0, KvBlock, RowBits,
                    gl.convert_layout(offs_m_abs, box_rows), tile_first_block, row_end, seq_k,
                    qk_scale, BOX_N, BOX_N, BLOCK_SIZE, SUB_BLOCKS, IS_CAUSAL, s_box_layout,
                    p_layout, P_DTYPE)
                m_i = gl.convert_layout(m_own, gl.SliceLayout(1, s_layout))
                l_i = gl.convert_layout(l_own, gl.SliceLayout(1, s_layout))
                p, m_i, l_i, acc = _next_step(
                    p_own, acc, m_i, l_i, 1, g, turn, q_op, k_bufs, v_bufs, k_ready, v_ready,
                    kv_empty, turns, first_box, n_boxes, full_boxes, KvBlock, RowBits, offs_m_abs,
                    tile_first_block, row_end, seq_k, qk_scale, BOX_N, BLOCK_SIZE, SUB_BLOCKS,
                    IS_CAUSAL, s_layout, o_layout, p_layout, HALF, HALF * BOX_N)
            else:
                _take_turn(turns, turn, HALF)
                qk = _issue_scores(q_op, k_bufs, k_ready, g, s_layout, 0, TILE_N)
                mbarrier.arrive(turns.index(1 - HALF), count=1)
                qk = warpgroup_mma_wait(0, deps=(qk,))
                # The accumulator is still zero: step 0's rescale factor is not needed.
                p, m_i, l_i, _alpha0 = _softmax_step(
                    qk, m_i, l_i, 0, first_box, n_boxes, full_boxes, KvBlock, RowBits,
                    offs_m_abs, tile_first_block, row_end, seq_k, qk_scale, TILE_N, BOX_N,
                    BLOCK_SIZE, SUB_BLOCKS, IS_CAUSAL, s_layout, p_layout, P_DTYPE)
            for j in range(1 + split, steps):
                p, m_i, l_i, acc = _next_step(
                    p, acc, m_i, l_i, j, g, turn, q_op, k_bufs, v_bufs, k_ready, v_ready,
                    kv_empty, turns, first_box, n_boxes, full_boxes, KvBlock, RowBits, offs_m_abs,
                    tile_first_block, row_end, seq_k, qk_scale, BOX_N, BLOCK_SIZE, SUB_BLOCKS,
                    IS_CAUSAL, s_layout, o_layout, p_layout, HALF, 0)
            mbarrier.arrive(q_empty, count=1)  # every q kᵀ of this item is done
            _take_turn(turns, turn + steps, HALF)
            acc = _issue_pv(p, acc, v_bufs, v_ready, g + steps - 1, 0)
            mbarrier.arrive(turns.index(1 - HALF), count=1)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            last = (g + steps - 1) % stages

            # -- epilogue --
            l_safe = gl.where(l_i == 0.0, 1.0, l_i)
            l_o = gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))
            out = acc / gl.expand_dims(l_o, 1)
            if TMA_STORE:
                # Stage the rows in the last step's k tile, which no q kᵀ reads once both
                # consumers have released this item's q, and copy them out with tensor-memory
                # stores: from registers, the scattered stores cost about a tenth of the 8k
                # forward (kernels/PERF.md). The stage goes back to the loader once the copies
                # have read it.
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
            turn += steps + 1
            i += 1
            if RETURN_LSE:
                # Natural-log log-sum-exp; m_i is in log2 units.
                lse = (m_i + gl.log2(l_safe)) * LN2
                offs_m_s = offs_m_abs - q_offset
                gl.store(Lse + off_zh.to(gl.int64) * seq_q + offs_m_s, lse,
                         mask=(offs_m_s >= 0) & (offs_m_s < seq_q))

    @gluon.jit
    def _sparse_attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, Out, Lse, Items, Starts, KvBlock,
                            RowBits,
                            stride_oz, stride_oh, stride_om, stride_ok,
                            num_heads, q_per_kv, seq_q, seq_k, n_tiles, first_tile, qk_scale,
                            BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                            BLOCK_SIZE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                            RETURN_LSE: gl.constexpr, BOXES: gl.constexpr, STAGES: gl.constexpr,
                            TMA_STORE: gl.constexpr):
        """Persistent: program ``p`` takes the work items in rows ``Starts[p]:Starts[p+1]`` of
        ``Items`` (see :func:`work_items`). With ``TMA_STORE`` the output leaves through
        ``o_desc`` (it needs two 64-key boxes a stage); without, through ``Out``'s pointers."""
        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        BOX_N: gl.constexpr = k_desc.block_type.shape[2]
        BOX_D: gl.constexpr = k_desc.block_type.shape[3]
        # Each stage holds one step's (BOXES * BOX_N, dim) kv tile. With 128-byte swizzling that
        # tile is stored as 128-byte column chunks, each all rows deep; the loader fills it with
        # one box per (rows, chunk) pair, and the consumers read the same bytes as one tile.
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
        mbarrier.init(q_empty, count=2)  # both consumers release the q tile
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a stage
        for i in gl.static_range(2):
            mbarrier.init(turns.index(i), count=1)
        q_tile = q_smem.reshape([BLOCK_M, HEAD_DIM])

        # Constexprs must be written into each partition's tuple: a tuple variable would turn
        # them into runtime values.
        gl.warp_specialize([
            (_softmax_partition, (q_tile, k_bufs, v_bufs, k_boxes, o_desc, q_ready, q_empty,
                                  k_ready, v_ready, kv_empty, turns, Items, Starts, KvBlock,
                                  RowBits, Out, Lse,
                                  stride_oz, stride_oh, stride_om, stride_ok,
                                  n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale,
                                  BLOCK_M, HEAD_DIM, BLOCK_SIZE, BOX_N, IS_CAUSAL, RETURN_LSE,
                                  TMA_STORE, 0)),
            (_softmax_partition, (q_tile, k_bufs, v_bufs, k_boxes, o_desc, q_ready, q_empty,
                                  k_ready, v_ready, kv_empty, turns, Items, Starts, KvBlock,
                                  RowBits, Out, Lse,
                                  stride_oz, stride_oh, stride_om, stride_ok,
                                  n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale,
                                  BLOCK_M, HEAD_DIM, BLOCK_SIZE, BOX_N, IS_CAUSAL, RETURN_LSE,
                                  TMA_STORE, 1)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_boxes, v_boxes, q_ready,
                               q_empty, k_ready, v_ready, kv_empty, Items, Starts, KvBlock,
                               n_tiles, first_tile, num_heads, q_per_kv, seq_k - seq_q,
                               BLOCK_M, BLOCK_SIZE, HEAD_DIM)),
        ], [4, 1], [240, 24])  # registers a thread: see MAX_REGS


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class WorkItems:
    """The persistent programs' work: program ``p`` takes rows ``starts[p]:starts[p+1]`` of
    ``items``, each (item number, first tile-plan entry, entries, leading entries no step masks,
    split first step or not). ``kv_block`` and ``row_bits`` are the tile plan's, with each split
    row's pair moved to its front."""

    items: torch.Tensor  # int32 (n_items, ITEM_COLUMNS)
    starts: torch.Tensor  # int32 (programs + 1,)
    kv_block: torch.Tensor  # int32 (nnz,)
    row_bits: torch.Tensor  # int32 (nnz,)


def split_first_steps(plan: TilePlan, block_size: int, boxes: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plan's entries (on the CPU) with a split pair first in each row that has one, and
    which rows do.

    A pair is a row's first block only the tile's upper 64 query rows keep (row bits 0b01) and
    its first only the lower 64 keep (0b10): one 128-key step holds both, and each consumer
    multiplies only its own 64 keys, half the work of that step. It takes 64-key blocks in
    128-key steps, and a row with more entries than the pair, so that a whole step follows it.
    Both blocks of a pair are masked entries, so the row's unmasked ones follow it unchanged.
    """
    kv_block, row_bits = plan.kv_block.cpu(), plan.row_bits.cpu()
    row_ptr = plan.row_ptr.cpu().long()
    rows = len(row_ptr) - 1
    split = torch.zeros(rows, dtype=torch.long)
    if block_size != BOX_N or BLOCK_M != 2 * block_size or boxes != 2 or not len(kv_block):
        return kv_block, row_bits, split
    counts = row_ptr[1:] - row_ptr[:-1]
    entry_row = torch.repeat_interleave(torch.arange(rows), counts)
    pos = torch.arange(len(kv_block)) - row_ptr[entry_row]
    absent = int(counts.max())  # past every position

    def first_kept_only_by(bits: int) -> torch.Tensor:
        hit = row_bits == bits
        return torch.full((rows,), absent).scatter_reduce(0, entry_row[hit], pos[hit], "amin")

    upper, lower = first_kept_only_by(0b01), first_kept_only_by(0b10)
    split = ((upper < absent) & (lower < absent) & (counts > 2)).long()
    in_split_row = split[entry_row].bool()
    rank = pos + 2
    rank[in_split_row & (pos == upper[entry_row])] = 0
    rank[in_split_row & (pos == lower[entry_row])] = 1
    order = torch.argsort(entry_row * (absent + 2) + rank)
    return kv_block[order], row_bits[order], split


def split_steps(layout: BlockLayout, seq_k: int, boxes: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`split_first_steps` of the layout's 128-row plan, cached on the layout (the work
    items and the owned steps' estimate both read it)."""
    return layout.cached(("split_first_steps", seq_k, boxes),
                         lambda: split_first_steps(tile_plan(layout, BLOCK_M, seq_k),
                                                   layout.block_size, boxes))


def work_items(layout: BlockLayout, seq_k: int, first_tile: int, batch: int, heads: int,
               boxes: int, programs: int, device: torch.device) -> WorkItems:
    """Deal the work items to up to ``programs`` programs, balanced by their kv steps (cached
    per shape).

    Item ``w`` is query tile ``w % n_tiles + first_tile`` of batch x head ``w // n_tiles``, as
    the kernel's ``_work_item`` reads it. Each row carries the item's tile-plan entries, so a
    program reads its next item with one load instead of two dependent ones.
    """
    def build() -> WorkItems:
        plan = tile_plan(layout, BLOCK_M, seq_k)
        kv_block, row_bits, split = split_steps(layout, seq_k, boxes)
        n_tiles = plan.tiles - first_tile
        item = torch.arange((batch * heads) * n_tiles)
        head = (item // n_tiles) % heads
        row = (head // (heads // layout.heads)) * plan.tiles + item % n_tiles + first_tile
        row_ptr = plan.row_ptr.cpu().long()
        first, count = row_ptr[row], row_ptr[row + 1] - row_ptr[row]
        steps = torch.clamp(torch.ceil(count * (layout.block_size // BOX_N) / boxes), min=1)
        # A split first step is half a step of work for each consumer.
        cost = steps.double() - 0.5 * split[row] + ITEM_OVERHEAD
        sched = balanced_schedule(cost, min(len(item), programs))
        order = sched.order.long()
        unmasked = plan.n_full.cpu().long()[row] + 2 * split[row]
        table = torch.stack([item, first, count, unmasked, split[row]], dim=1)[order]
        return WorkItems(table.to(torch.int32).contiguous().to(device), sched.starts.to(device),
                         kv_block.to(device), row_bits.to(device))

    key = ("ws_items", seq_k, first_tile, batch, heads, boxes, programs, str(device))
    return layout.cached(key, build)


def _descriptor(x: torch.Tensor, rows: int, cols: int) -> "GluonDescriptor":
    block = [1, 1, rows, cols]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if x.dtype == torch.bfloat16
                                                  else gl.float16)
    return GluonDescriptor(x, list(x.shape), list(x.stride()), block, layout)


def unavailable(capability: tuple[int, int] | None, dtype: torch.dtype) -> str | None:
    """Why this kernel cannot run on a device of this compute capability (None: not a CUDA
    device) for this dtype, or None when it can."""
    if capability is None or capability[0] != 9:
        return "impl='gluon' runs on Hopper (compute capability 9.x) only"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"impl='gluon' runs float16 and bfloat16 only, not {dtype}"
    if not GLUON:
        return f"impl='gluon' needs Gluon, which triton {triton.__version__} does not have"
    return None


def refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
            tma: bool = True) -> str | None:
    """Why this kernel cannot take the call (None: it can); :mod:`kernels.fwd` takes the rest.
    ``tma=False`` (measuring the pointer path) refuses: this kernel reads through tensor-memory
    copies only."""
    if not tma:
        return "impl='gluon' reads through tensor-memory copies, and the call has tma=False"
    why = unavailable(torch.cuda.get_device_capability(q.device) if q.is_cuda else None, q.dtype)
    if why:
        return why
    if q.shape[3] not in (64, 128):
        return f"impl='gluon' needs head_dim 64 or 128, got {q.shape[3]}"
    if layout.block_size % BOX_N or not (layout.block_size % BLOCK_M == 0
                                           or BLOCK_M % layout.block_size == 0):
        return (f"impl='gluon' needs a sparse block size that is a multiple of {BOX_N} and "
                f"divides or is a multiple of {BLOCK_M}, got {layout.block_size}")
    if not all(tma_compatible(x) for x in (q, k, v)):
        return "impl='gluon' needs q, k and v in strides tensor-memory copies can read"
    return None


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
             tma: bool = True) -> bool:
    """Whether the warp-specialised kernel can take this call (else :mod:`kernels.fwd` does)."""
    return refusal(q, k, v, layout, tma) is None


def sparse_attention_fwd_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            layout: BlockLayout, sm_scale: float, return_lse: bool = True,
                            out: torch.Tensor | None = None, stages: int = 3, boxes: int = 2
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`kernels.fwd.sparse_attention_fwd` for calls :func:`eligible` accepts: ``boxes``
    64-key copies per kv tile (a config's ``block_n // 64``), ``stages`` kv tiles in flight."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    plan = tile_plan(layout, BLOCK_M, seq_k)
    if out is None:
        out = buffers.new_output((batch, seq_q, heads, head_dim), q, q.dtype).transpose(1, 2)
    lse = buffers.new_output((batch, heads, seq_q) if return_lse else (1,), q, torch.float32)
    first_tile = (seq_k - seq_q) // BLOCK_M
    work = work_items(layout, seq_k, first_tile, batch, heads, boxes, _sm_count(q.device),
                      q.device)
    grid = (len(work.starts) - 1,)  # persistent: one program per SM
    box_d = 128 // q.element_size()  # one 128-byte swizzle span of columns per k/v copy
    # The output is staged in a k tile's two 64-key boxes, one per consumer. Stores skip rows
    # past the end; rows before the first query only come with a first tile that starts before
    # it, which the pointer stores take.
    tma_store = (boxes == 2 and (seq_k - seq_q) % BLOCK_M == 0 and out.dtype == q.dtype
                 and tma_compatible(out))
    _sparse_attn_fwd_ws[grid](
        _descriptor(q, BLOCK_M, head_dim), _descriptor(k, BOX_N, box_d),
        _descriptor(v, BOX_N, box_d), _descriptor(out if tma_store else k, BOX_N, box_d), out, lse,
        work.items, work.starts, work.kv_block, work.row_bits, *out.stride(),
        heads, heads // kv_heads, seq_q, seq_k, plan.tiles - first_tile, first_tile,
        qk_scale(sm_scale),
        BLOCK_M=BLOCK_M, HEAD_DIM=head_dim, BLOCK_SIZE=layout.block_size,
        IS_CAUSAL=layout.causal, RETURN_LSE=return_lse, BOXES=boxes, STAGES=stages,
        TMA_STORE=tma_store, num_warps=4, maxnreg=MAX_REGS,
    )
    return out, (lse if return_lse else None)
