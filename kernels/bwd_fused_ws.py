"""The five-product backward for Hopper, written in Gluon: dq, dk and dv in one kernel.

The two-kernel backward runs 7 matrix products per kept pair (the dq kernel recomputes sᵀ and
dpᵀ); the fused Triton kernel (:mod:`kernels.bwd_fused`) runs 5 but adds a 64 x d fp32 dq tile
per 64-key step by atomics, whose traffic is added to its products' time (kernels/PERF.md,
session 18). This kernel takes FlashAttention-3's shape for the backward instead:

- a work item is 128 keys (two 64-key boxes of one kv head, gathered side by side) and every
  query row that keeps either box, for each query head of the GQA group: half the dq bytes a
  product. Boxes pair by likeness (:func:`pair_boxes`): a row that keeps one box of the two is
  half a step wasted, and phi-3's vertical blocks keep the rows their like eight blocks on keep,
  not their neighbours';
- one consumer of two warp groups (8 warps) holds dk and dv for the 128 keys, 64 keys a warp
  group; per 64-row query step it takes sᵀ = k qᵀ and dpᵀ = v dOᵀ, pᵀ = exp2(sᵀ scale - lse),
  dv += pᵀ dO, dsᵀ = pᵀ (dpᵀ - delta), dk += dsᵀ q, then stores dsᵀ to shared memory, where
  dq = ds k (64 rows x d, each warp group half of d) reads it;
- each step's dq tile goes from registers to one of two shared-memory buffers and out to an
  fp32 accumulator by one tensor-memory reduce (``cp.reduce.async.bulk``), which the copy
  engine runs while the consumer goes on: the buffer is waited for two steps later;
- a loader warp copies each item's k and v boxes, then streams every step's q and dO tiles
  with their rows' lse and delta (:func:`kernels.bwd_dkdv_ws.row_statistics`) through a ring
  of stages.

A step whose query block keeps only one of the item's boxes, or needs the causal or ragged
mask, masks its scores; the plan (:func:`pair_plan`) lists each (query head, box pair)'s
query blocks, unmasked ones first, with which box keeps each. Around the kernel run the fused
backward's pre-pass (delta, and the accumulator zeroed) and the scaling of dq.

Measured on an H200 (kernels/PERF.md, session 19) it runs phi-3's backward at the two-kernel
backward's speed (0.93-0.99x), a dense causal one 1.11x faster; it is reached through
``benchmarks/bwd_split.py`` and its tests, not yet through a config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from . import buffers
from .bwd import grad_like, kernel_constants
from .bwd_dkdv_ws import _stat_descriptor, row_statistics
from .bwd_fused import PREP_ROWS, _bwd_fused_prep
from .common import index_table, qk_scale, tma_compatible
from .fwd_ws import GLUON, MAX_REGS, _sm_count
from .fwd_ws import unavailable as gluon_unavailable
from .layout import BlockLayout
from .schedule import balanced_schedule

if GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import builtin
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    from .fwd_ws import _reinterpret, _tma_load

    # A barrier of the calling partition's warps: gl.barrier from triton 3.9 on.
    _warps_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

    if hasattr(tma, "async_atomic_add"):  # triton 3.7 on
        _tma_reduce_add = tma.async_atomic_add
    else:
        from triton._C.libtriton import ir as _ir

        @builtin
        def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
            """Add shared-memory tile ``src`` into the tensor at ``coord`` (one bulk reduce);
            the builder call later tritons wrap as ``tma.async_atomic_add``."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD,
                                                      tensor_desc.handle, coord, src.handle)

BOX = 64  # keys per tensor-memory copy; an item holds two
ITEM_KEYS = 2 * BOX
Q_TILE = 64  # query rows a step
DQ_BUFFERS = 2  # dq tiles staged for their reduces
DQ_BUFS = triton.language.constexpr(DQ_BUFFERS)  # the same, for the kernel
BOX_ROWS = triton.language.constexpr(BOX)
Q_ROWS = triton.language.constexpr(Q_TILE)
# A work item's fixed cost in steps (k and v copied in, dk and dv stored), for the deal.
ITEM_OVERHEAD = 2.0
# Shared memory a program may take on Hopper (227 KB).
SHARED_LIMIT = 232448
DEFAULT_STAGES = 2


def shared_bytes(head_dim: int, stages: int) -> int:
    """Shared memory of the kernel: the item's k and v (128 keys each, 16-bit), ``stages`` q and
    dO tiles with their rows' lse and delta, the dsᵀ tile, the dq buffers (fp32) and barriers."""
    kv = 2 * ITEM_KEYS * head_dim * 2
    per_stage = 2 * Q_TILE * head_dim * 2 + 2 * Q_TILE * 4
    ds = ITEM_KEYS * Q_TILE * 2
    dq = DQ_BUFFERS * Q_TILE * head_dim * 4
    return kv + stages * per_stage + ds + dq + 1024


def max_stages(head_dim: int) -> int:
    """The most q/dO stages that fit beside the rest (2 at head_dim 128), at most 4."""
    stages = 1
    while stages < 4 and shared_bytes(head_dim, stages + 1) <= SHARED_LIMIT:
        stages += 1
    return stages


@dataclass(frozen=True)
class PairPlan:
    """The work of each (query head, box pair), unmasked entries first in each row.

    Pair ``j`` of kv head ``g`` is 64-key boxes ``boxes[g, j]`` (box ``i`` is keys ``64 i`` on;
    ``n_boxes``, past the last key, stands for no box). Row ``h * pairs + j`` lists the query
    blocks that keep either box of query head ``h``'s pair ``j`` (of its kv head), entries
    ``[row_ptr[r], row_ptr[r+1])``, the first ``n_full[r]`` needing no mask; ``bits[e]`` has
    bit 0 set when the entry's query block keeps the first box, bit 1 the second. An entry needs
    a mask when it keeps one box only, is the causal diagonal, is the ragged last query block,
    or straddles the first query.
    """

    boxes: torch.Tensor  # int32 (kv_heads, pairs, 2)
    row_ptr: torch.Tensor  # int32 (heads * pairs + 1,)
    n_full: torch.Tensor  # int32 (heads * pairs,)
    q_block: torch.Tensor  # int32 (nnz,)
    bits: torch.Tensor  # int32 (nnz,)
    pairs: int


# How far apart two boxes paired for their likeness may be, in boxes: phi-3's vertical blocks
# (stride 8) find their like eight blocks on.
PAIR_WINDOW = 16


def pair_boxes(kept: torch.Tensor, same_block: bool) -> torch.Tensor:
    """Each kv head's boxes in pairs, ``(kv_heads, pairs, 2)`` int32, from ``kept``
    ``(kv_heads, rows, n_boxes)``: which (query head, query block) rows keep each box.

    A pair's steps are the rows that keep either box, so a row that keeps one of them only is
    half a step wasted: each box, in order, takes the free box within :data:`PAIR_WINDOW` after
    it whose rows differ from its own least (the nearer on ties). ``same_block``: boxes 2i and
    2i+1 share a sparse block (and so their rows), so they pair as they stand. An odd box out
    pairs with no box (index ``n_boxes``)."""
    kv_heads, _, n_boxes = kept.shape
    pairs = -(-n_boxes // 2)
    if same_block:
        boxes = torch.arange(2 * pairs, dtype=torch.int32).clamp(max=n_boxes)
        return boxes.view(1, pairs, 2).expand(kv_heads, pairs, 2).contiguous()
    # A box with no free box in its window pairs alone, so there may be more pairs than half.
    out = torch.full((kv_heads, n_boxes, 2), n_boxes, dtype=torch.int32)
    kept = kept.cpu()
    used = 0
    for g in range(kv_heads):
        sig = kept[g]
        # diff[a, d - 1]: rows box a and box a + d do not share.
        diff = torch.full((n_boxes, PAIR_WINDOW), -1, dtype=torch.int64)
        for d in range(1, min(PAIR_WINDOW, n_boxes - 1) + 1):
            diff[:n_boxes - d, d - 1] = (sig[:, :n_boxes - d] ^ sig[:, d:]).sum(0)
        diff = diff.tolist()
        taken = [False] * n_boxes
        j = 0
        for a in range(n_boxes):
            if taken[a]:
                continue
            taken[a] = True
            best, partner = None, n_boxes
            for d, cost in enumerate(diff[a], start=1):
                if cost >= 0 and not taken[a + d] and (best is None or cost < best):
                    best, partner = cost, a + d
            if partner < n_boxes:
                taken[partner] = True
            out[g, j, 0], out[g, j, 1] = a, partner
            j += 1
        used = max(used, j)
    return out[:, :used].contiguous()


def build_pair_plan(layout: BlockLayout, seq_q: int, seq_k: int, heads: int,
                    kv_heads: int) -> PairPlan:
    """:class:`PairPlan` of ``layout`` for ``heads`` query heads on ``kv_heads``, queries the
    last ``seq_q`` of ``seq_k`` positions (the block size a multiple of 64)."""
    bs = layout.block_size
    nb = math.ceil(seq_k / bs)
    n_boxes = math.ceil(seq_k / BOX)
    offset = seq_k - seq_q
    device = layout.pattern.device
    q_per_kv = heads // kv_heads
    head_pattern = torch.arange(heads, device=device) // (heads // layout.heads)
    box_block = (torch.arange(n_boxes + 1, device=device) * BOX) // bs
    qb = torch.arange(nb, device=device)
    has_queries = (qb + 1) * bs > offset
    # (heads, q block, box): the last box column is "no box", kept by nobody.
    kept_box = layout.pattern[:, :nb, :nb][head_pattern][:, :, box_block.clamp(max=nb - 1)]
    kept_box = kept_box & has_queries[None, :, None]
    kept_box[:, :, n_boxes] = False
    boxes = pair_boxes(kept_box[:, :, :n_boxes].reshape(kv_heads, q_per_kv * nb, n_boxes),
                       same_block=bs > BOX)
    pairs = boxes.shape[1]
    head_boxes = boxes.to(device).repeat_interleave(q_per_kv, 0).long()  # (heads, pairs, 2)
    hh = torch.arange(heads, device=device)[:, None, None]
    first = kept_box[hh, qb[None, None, :], head_boxes[:, :, :1]]  # (heads, pairs, q block)
    second = kept_box[hh, qb[None, None, :], head_boxes[:, :, 1:]]
    kept = first | second
    partial_q = ((qb + 1) * bs > seq_k) | (qb * bs < offset)
    masked = (first != second) | partial_q[None, None, :]
    if layout.causal:
        pair_blocks = box_block[head_boxes]  # (heads, pairs, 2)
        masked = masked | (pair_blocks[..., None] == qb).any(2)
    bits = first.to(torch.int32) | (second.to(torch.int32) << 1)
    table = index_table(kept, masked)
    return PairPlan(boxes.to(device), table.row_ptr, table.n_full, table.col.to(torch.int32),
                    bits[table.head, table.row, table.col].contiguous(), pairs)


def pair_plan(layout: BlockLayout, seq_q: int, seq_k: int, heads: int,
              kv_heads: int) -> PairPlan:
    """:func:`build_pair_plan`, cached on the layout per lengths, heads and device."""
    return layout.cached(("bwd_pair_plan", seq_q, seq_k, heads, kv_heads, layout.pattern.device),
                         lambda: build_pair_plan(layout, seq_q, seq_k, heads, kv_heads))


if GLUON:
    @gluon.jit
    def _item(w, n_pairs, kv_heads):
        """Work item ``w`` (box pairs fastest, then batch x kv head): pair, batch, kv head."""
        zkv = w // n_pairs
        return w % n_pairs, zkv // kv_heads, zkv % kv_heads

    @gluon.jit
    def _load_partition(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_bufs, do_bufs,
                        lse_bufs, delta_bufs, k_boxes, v_boxes, ready, empty, kv_ready, kv_empty,
                        Items, Starts, Boxes, RowPtr, QBlock, n_pairs, num_heads, kv_heads,
                        q_per_kv, stat_stride, q_offset, BLOCK_SIZE: gl.constexpr):
        """Loader warp: each work item's k and v boxes (once the consumer is done with the last
        item's), then the q and dO tiles of its steps, with their rows' lse and delta, through
        the stages."""
        stages: gl.constexpr = ready.shape[0]
        N_SUB: gl.constexpr = BLOCK_SIZE // Q_ROWS
        BOX_D: gl.constexpr = k_desc.block_type.shape[3]
        CHUNKS: gl.constexpr = k_boxes.shape[0] // 2
        pid = gl.program_id(0)
        g = 0  # steps issued so far: the ring position
        i = 0  # items so far: the k/v buffers' phase
        for slot in range(gl.load(Starts + pid), gl.load(Starts + pid + 1)):
            pair, off_z, off_kvh = _item(gl.load(Items + slot), n_pairs, kv_heads)
            mbarrier.wait(kv_empty, (i & 1) ^ 1)
            mbarrier.expect(kv_ready, 2 * k_boxes.shape[0] * k_desc.block_type.nbytes)
            for b in gl.static_range(2):
                # A box past the last key (or no box) reads zeros, which no kept entry uses.
                first_key = gl.load(Boxes + (off_kvh * n_pairs + pair) * 2 + b) * BOX_ROWS
                for c in gl.static_range(CHUNKS):
                    # Box b's column chunk c, where the 128-key tile's layout keeps it: chunk
                    # by chunk, each the two boxes' rows one after the other.
                    _tma_load(k_desc, [off_z, off_kvh, first_key, c * BOX_D], kv_ready,
                              k_boxes.index(c * 2 + b))
                    _tma_load(v_desc, [off_z, off_kvh, first_key, c * BOX_D], kv_ready,
                              v_boxes.index(c * 2 + b))
            for gq in range(0, q_per_kv):
                off_h = off_kvh * q_per_kv + gq
                row = off_h * n_pairs + pair
                stat = (off_z * num_heads + off_h) * stat_stride + q_offset
                for t in range(gl.load(RowPtr + row) * N_SUB, gl.load(RowPtr + row + 1) * N_SUB):
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
    def _fused_step(dk, dv, k_op, v_op, q_tiles, do_tiles, lse_bufs, delta_bufs, ds_smem,
                    dq_tiles, dq_bufs, dq_desc, ready, empty, g, t, MASKED: gl.constexpr,
                    QBlock, Bits, offs_n, half, q_offset, seq_q, qk_scale, off_z, off_h,
                    BLOCK_SIZE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                    s_layout: gl.constexpr, op_layout: gl.constexpr, dq_layout: gl.constexpr):
        """One step: the 64 query rows of entry ``t // N_SUB``'s sub-tile ``t % N_SUB``, in
        ring slot ``g % stages``; dk and dv accumulate, the step's dq tile goes out by a
        reduce."""
        stages: gl.constexpr = ready.shape[0]
        N_SUB: gl.constexpr = BLOCK_SIZE // Q_ROWS
        HEAD_DIM: gl.constexpr = q_tiles.shape[2]
        s = g % stages
        mbarrier.wait(ready.index(s), (g // stages) & 1)
        q_tile = q_tiles.index(s)
        do_tile = do_tiles.index(s)
        zero = gl.zeros([2 * BOX_ROWS, Q_ROWS], gl.float32, s_layout)
        st = warpgroup_mma(k_op, q_tile.permute((1, 0)), zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_op, do_tile.permute((1, 0)), zero, use_acc=False, is_async=True)
        rows: gl.constexpr = gl.SliceLayout(0, s_layout)
        start_m_abs = gl.load(QBlock + t // N_SUB) * BLOCK_SIZE + (t % N_SUB) * Q_ROWS
        st = warpgroup_mma_wait(1, deps=(st,))
        lse = lse_bufs.index(s).load(rows)  # log2 units already
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        if MASKED:
            offs_m_abs = start_m_abs + gl.arange(0, Q_ROWS, layout=rows)
            offs_m = offs_m_abs - q_offset
            box_keeps = ((gl.load(Bits + t // N_SUB) >> half) & 1) != 0
            keep = (gl.expand_dims(box_keeps, 1)
                    & gl.expand_dims((offs_m >= 0) & (offs_m < seq_q), 0))
            if IS_CAUSAL:
                keep = keep & (gl.expand_dims(offs_m_abs, 0) >= gl.expand_dims(offs_n, 1))
            pt = gl.where(keep, pt, 0.0)
        dv = warpgroup_mma(gl.convert_layout(pt.to(q_tile.dtype), op_layout), do_tile, dv,
                           is_async=True)
        dpt = warpgroup_mma_wait(1, deps=(dpt,))
        delta = delta_bufs.index(s).load(rows)
        ds = (pt * (dpt - gl.expand_dims(delta, 0))).to(q_tile.dtype)
        dk = warpgroup_mma(gl.convert_layout(ds, op_layout), q_tile, dk, is_async=True)
        # dq = ds k needs ds with query rows: through shared memory, where the other warp
        # group's keys meet it. The reduce that read this step's dq buffer (two steps ago)
        # must be done before the barrier lets anyone write it.
        b = g % DQ_BUFS
        tma.store_wait(DQ_BUFS - 1)
        ds_smem.store(ds)
        fence_async_shared()
        _warps_barrier()
        zero_dq = gl.zeros([Q_ROWS, HEAD_DIM], gl.float32, dq_layout)
        dq = warpgroup_mma(ds_smem.permute((1, 0)), k_op, zero_dq, use_acc=False, is_async=True)
        # No product is left in flight across steps: ptxas serialises every wgmma otherwise.
        dq, dk, dv = warpgroup_mma_wait(0, deps=(dq, dk, dv))
        dq_tiles.index(b).store(dq)
        fence_async_shared()
        _warps_barrier()  # every warp is done with the slot's tiles, and dq is staged
        mbarrier.arrive(empty.index(s), count=1)
        _tma_reduce_add(dq_desc, [off_z, off_h, start_m_abs, 0], dq_bufs.index(b))
        return dk, dv

    @gluon.jit
    def _fused_partition(q_tiles, do_tiles, lse_bufs, delta_bufs, k_tile, v_tile, ds_smem,
                         dq_tiles, dq_bufs, dq_desc, ready, empty, kv_ready, kv_empty, Items,
                         Starts, Boxes, RowPtr, NFull, QBlock, Bits, DK, DV,
                         stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                         stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                         n_pairs, kv_heads, q_per_kv, seq_q, seq_k,
                         qk_scale, sm_scale, HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                         IS_CAUSAL: gl.constexpr):
        """The consumer (two warp groups): dk and dv of each work item, its steps' dq."""
        NUM_WARPS: gl.constexpr = 8
        N_SUB: gl.constexpr = BLOCK_SIZE // Q_ROWS
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, Q_ROWS, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        # dq's 64 rows are too few for two warp groups stacked: each takes half of head_dim.
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, HEAD_DIM // 2, 16])
        q_offset = seq_k - seq_q
        pid = gl.program_id(0)
        key_rows = gl.arange(0, 2 * BOX_ROWS, layout=gl.SliceLayout(1, s_layout))
        half = key_rows // BOX_ROWS  # the box of each of the item's keys
        g = 0  # steps consumed so far: the ring position
        i = 0  # items so far: the k/v buffers' phase
        for slot in range(gl.load(Starts + pid), gl.load(Starts + pid + 1)):
            pair, off_z, off_kvh = _item(gl.load(Items + slot), n_pairs, kv_heads)
            # The item's keys: its first box's 64, then its second's.
            box_row = Boxes + (off_kvh * n_pairs + pair) * 2
            offs_n = (gl.where(half == 0, gl.load(box_row), gl.load(box_row + 1)) * BOX_ROWS
                      + key_rows % BOX_ROWS)
            dk = gl.zeros([2 * BOX_ROWS, HEAD_DIM], gl.float32, o_layout)
            dv = gl.zeros([2 * BOX_ROWS, HEAD_DIM], gl.float32, o_layout)
            mbarrier.wait(kv_ready, i & 1)
            for gq in range(0, q_per_kv):
                off_h = off_kvh * q_per_kv + gq
                row = off_h * n_pairs + pair
                start = gl.load(RowPtr + row)
                mid = start + gl.load(NFull + row)
                end = gl.load(RowPtr + row + 1)
                # The entries no step masks, then those that need it.
                for t in range(start * N_SUB, mid * N_SUB):
                    dk, dv = _fused_step(dk, dv, k_tile, v_tile, q_tiles, do_tiles, lse_bufs,
                                         delta_bufs, ds_smem, dq_tiles, dq_bufs, dq_desc, ready,
                                         empty, g, t, False, QBlock, Bits, offs_n, half,
                                         q_offset, seq_q, qk_scale, off_z, off_h, BLOCK_SIZE,
                                         IS_CAUSAL, s_layout, op_layout, dq_layout)
                    g += 1
                for t in range(mid * N_SUB, end * N_SUB):
                    dk, dv = _fused_step(dk, dv, k_tile, v_tile, q_tiles, do_tiles, lse_bufs,
                                         delta_bufs, ds_smem, dq_tiles, dq_bufs, dq_desc, ready,
                                         empty, g, t, True, QBlock, Bits, offs_n, half,
                                         q_offset, seq_q, qk_scale, off_z, off_h, BLOCK_SIZE,
                                         IS_CAUSAL, s_layout, op_layout, dq_layout)
                    g += 1
            # Every product reading k and v is done: each step ends at a barrier past its
            # last wait (and an item with no steps read nothing).
            mbarrier.arrive(kv_empty, count=1)

            # -- epilogue: dS was taken w.r.t. the scaled scores --
            rows_o = gl.arange(0, 2 * BOX_ROWS, layout=gl.SliceLayout(1, o_layout))
            offs_n_o = (gl.where(rows_o < BOX_ROWS, gl.load(box_row), gl.load(box_row + 1))
                        * BOX_ROWS + rows_o % BOX_ROWS)
            offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            n_ok = gl.expand_dims(offs_n_o < seq_k, 1)
            rows64 = gl.expand_dims(offs_n_o.to(gl.int64), 1)
            dk_ptrs = (DK + off_z.to(gl.int64) * stride_dkz + off_kvh.to(gl.int64) * stride_dkh
                       + rows64 * stride_dkn + gl.expand_dims(offs_d * stride_dkk, 0))
            gl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok)
            dv_ptrs = (DV + off_z.to(gl.int64) * stride_dvz + off_kvh.to(gl.int64) * stride_dvh
                       + rows64 * stride_dvn + gl.expand_dims(offs_d * stride_dvk, 0))
            gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok)
            i += 1
        tma.store_wait(0)  # the last reduces, before the program ends

    @gluon.jit
    def _bwd_fused_ws(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, dq_desc, DK, DV,
                      Items, Starts, Boxes, RowPtr, NFull, QBlock, Bits,
                      stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                      stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                      n_pairs, num_heads, kv_heads, q_per_kv,
                      seq_q, seq_k, stat_stride, qk_scale, sm_scale,
                      HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                      STAGES: gl.constexpr):
        """Persistent: program ``p`` takes the work items in rows ``Starts[p]:Starts[p+1]`` of
        ``Items``."""
        dtype: gl.constexpr = q_desc.dtype
        q_layout: gl.constexpr = q_desc.layout
        kv_layout: gl.constexpr = k_desc.layout
        dq_layout: gl.constexpr = dq_desc.layout
        q_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, Q_ROWS, HEAD_DIM], q_layout)
        do_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, Q_ROWS, HEAD_DIM], q_layout)
        # k and v come in (64 keys, 64 columns) copies: a 128-key tile's shared layout holds
        # its columns in 64-wide chunks, each with all 128 rows.
        BOX_D: gl.constexpr = k_desc.block_type.shape[3]
        CHUNKS: gl.constexpr = HEAD_DIM // BOX_D
        k_boxes = gl.allocate_shared_memory(dtype, [2 * CHUNKS, 1, 1, BOX_ROWS, BOX_D],
                                            kv_layout)
        v_boxes = gl.allocate_shared_memory(dtype, [2 * CHUNKS, 1, 1, BOX_ROWS, BOX_D],
                                            kv_layout)
        dq_bufs = gl.allocate_shared_memory(gl.float32, [DQ_BUFS, 1, 1, Q_ROWS, HEAD_DIM],
                                            dq_layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * BOX_ROWS, Q_ROWS],
                                                                       dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [2 * BOX_ROWS, Q_ROWS], ds_layout)
        stat_layout: gl.constexpr = lse_desc.layout
        lse_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, Q_ROWS], stat_layout)
        delta_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, Q_ROWS], stat_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        mbarrier.init(kv_ready, count=1)
        mbarrier.init(kv_empty, count=1)
        # The descriptors' boxes are (1, 1, rows, dim): the same bytes as (rows, dim) tiles,
        # and the two 64-key boxes side by side are the item's 128-key tile.
        tiles_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_ROWS, HEAD_DIM],
                                                                          dtype)
        q_tiles = _reinterpret(q_bufs, dtype, [STAGES, Q_ROWS, HEAD_DIM], tiles_layout)
        do_tiles = _reinterpret(do_bufs, dtype, [STAGES, Q_ROWS, HEAD_DIM], tiles_layout)
        kv_tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
            [2 * BOX_ROWS, HEAD_DIM], dtype)
        k_tile = _reinterpret(k_boxes, dtype, [2 * BOX_ROWS, HEAD_DIM], kv_tile_layout)
        v_tile = _reinterpret(v_boxes, dtype, [2 * BOX_ROWS, HEAD_DIM], kv_tile_layout)
        dq_tiles_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_ROWS, HEAD_DIM],
                                                                             gl.float32)
        dq_tiles = _reinterpret(dq_bufs, gl.float32, [DQ_BUFS, Q_ROWS, HEAD_DIM],
                                dq_tiles_layout)

        # Constexprs written into each partition's tuple (a tuple variable would make them
        # runtime values).
        gl.warp_specialize([
            (_fused_partition, (q_tiles, do_tiles, lse_bufs, delta_bufs, k_tile, v_tile, ds_smem,
                                dq_tiles, dq_bufs, dq_desc, ready, empty, kv_ready, kv_empty,
                                Items, Starts, Boxes, RowPtr, NFull, QBlock, Bits, DK, DV,
                                stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                                stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                                n_pairs, kv_heads, q_per_kv, seq_q, seq_k,
                                qk_scale, sm_scale, HEAD_DIM, BLOCK_SIZE, IS_CAUSAL)),
            (_load_partition, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_bufs,
                               do_bufs, lse_bufs, delta_bufs, k_boxes, v_boxes, ready, empty,
                               kv_ready, kv_empty, Items, Starts, Boxes, RowPtr, QBlock, n_pairs,
                               num_heads, kv_heads, q_per_kv, stat_stride, seq_k - seq_q,
                               BLOCK_SIZE)),
        ], [1], [24])  # registers a thread: the consumer gets what is left (240)


@dataclass(frozen=True)
class FusedItems:
    """Program ``p`` takes rows ``starts[p]:starts[p+1]`` of ``items`` (item numbers: box pair
    fastest, then batch x kv head)."""

    items: torch.Tensor  # int32 (n_items,)
    starts: torch.Tensor  # int32 (programs + 1,)


def fused_items(layout: BlockLayout, plan: PairPlan, seq_q: int, seq_k: int, batch: int,
                heads: int, kv_heads: int, programs: int, device: torch.device) -> FusedItems:
    """Deal the (box pair, batch x kv head) items to up to ``programs`` programs, balanced by
    their steps in ``plan`` (cached per shape)."""
    def build() -> FusedItems:
        row_ptr = plan.row_ptr.cpu().long()
        entries = (row_ptr[1:] - row_ptr[:-1]).view(heads, plan.pairs)
        steps = entries * (layout.block_size // Q_TILE)
        group = steps.view(kv_heads, heads // kv_heads, plan.pairs).sum(1)  # (kv heads, pairs)
        cost = (group.double() + ITEM_OVERHEAD).repeat(batch, 1).flatten()
        sched = balanced_schedule(cost, min(len(cost), programs))
        return FusedItems(sched.order.to(device), sched.starts.to(device))

    key = ("fused_ws_items", seq_q, seq_k, batch, heads, kv_heads, programs, str(device))
    return layout.cached(key, build)


def refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
            do: torch.Tensor) -> str | None:
    """Why this kernel cannot take the call (None: it can)."""
    why = gluon_unavailable(torch.cuda.get_device_capability(q.device) if q.is_cuda else None,
                            q.dtype)
    if why:
        return why
    if q.shape[3] not in (64, 128):
        return f"the Gluon fused backward needs head_dim 64 or 128, got {q.shape[3]}"
    if layout.block_size % BOX:
        return (f"the Gluon fused backward needs a sparse block size that is a multiple of "
                f"{BOX}, got {layout.block_size}")
    if not all(tma_compatible(x) for x in (q, k, v, do)):
        return "the Gluon fused backward needs q, k, v and dO in strides tensor-memory copies can read"
    return None


def _descriptor(x: torch.Tensor, rows: int, cols: int | None = None) -> "GluonDescriptor":
    block = [1, 1, rows, cols or x.shape[3]]
    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
             torch.float32: gl.float32}[x.dtype]
    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return GluonDescriptor(x, list(x.shape), list(x.stride()), block, layout)


def sparse_attention_bwd_fused_ws(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  layout: BlockLayout, sm_scale: float,
                                  stages: int = DEFAULT_STAGES
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv for ``(batch, heads, seq, dim)`` views of a call :func:`refusal` accepts, as
    :func:`kernels.bwd.sparse_attention_bwd` returns them; ``stages`` q/dO tiles in flight."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if not 1 <= stages <= max_stages(head_dim):
        raise ValueError(f"stages must be 1 to {max_stages(head_dim)} at head_dim {head_dim}, "
                         f"got {stages}")
    dk, dv = grad_like(k), grad_like(v)
    delta = buffers.new_output((batch, heads, seq_q), q, torch.float32)
    # In the gradients' (batch, seq, heads, dim) memory order, so for fp32 inputs the buffer,
    # scaled in place, is dq itself. Its rows are the queries' absolute positions (the
    # reduces' coordinates are never negative); rows before the first query take zeros only.
    q_offset = seq_k - seq_q
    acc_rows = buffers.new_output((batch, seq_k, heads, head_dim), q, torch.float32)
    acc_rows[:, :q_offset].zero_()
    acc_rows = acc_rows.transpose(1, 2)
    acc = acc_rows[:, :, q_offset:]
    constants = kernel_constants(q, layout)
    _bwd_fused_prep[(triton.cdiv(seq_q, PREP_ROWS), batch * heads)](
        out, do, delta, acc, *out.stride(), *do.stride(), *acc.stride(), heads, seq_q,
        BLOCK_M=PREP_ROWS, BLOCK_D=constants["BLOCK_D"], HEAD_DIM=constants["HEAD_DIM"])

    plan = pair_plan(layout, seq_q, seq_k, heads, kv_heads)
    programs = _sm_count(q.device)
    work = fused_items(layout, plan, seq_q, seq_k, batch, heads, kv_heads, programs, q.device)
    stats = row_statistics(lse, delta, seq_k)
    _bwd_fused_ws[(len(work.starts) - 1,)](
        _descriptor(q, Q_TILE), _descriptor(do, Q_TILE), _descriptor(k, BOX, BOX),
        _descriptor(v, BOX, BOX), _stat_descriptor(stats[0]), _stat_descriptor(stats[1]),
        _descriptor(acc_rows, Q_TILE), dk, dv, work.items, work.starts, plan.boxes,
        plan.row_ptr, plan.n_full, plan.q_block, plan.bits, *dk.stride(), *dv.stride(),
        plan.pairs, heads, kv_heads, heads // kv_heads, seq_q, seq_k, stats.shape[2], qk_scale(sm_scale), sm_scale,
        HEAD_DIM=head_dim, BLOCK_SIZE=layout.block_size, IS_CAUSAL=layout.causal,
        STAGES=stages, num_warps=8, maxnreg=MAX_REGS,
    )
    # The kernel adds dS K unscaled: one multiply per element here, not one per pair there.
    dq = acc if q.dtype == torch.float32 else grad_like(q)
    torch.mul(acc, sm_scale, out=dq)
    return dq, dk, dv
