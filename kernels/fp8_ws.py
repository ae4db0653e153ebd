"""Warp-specialised fp8 forward for Hopper, written in Gluon (fp8 configs with ``impl="gluon"``).

The Gluon forward's structure (:mod:`kernels.fwd_ws`: a loader warp, two 64-row consumer warp
groups, persistent programs over a balanced deal of work items) with :mod:`kernels.fp8`'s
arithmetic: e4m3 q, k and vᵀ, both products on e4m3 operands, the descales folded into the
softmax scale and the normalisation, p scaled by ``2**P_SHIFT`` and rounded to e4m3 in
registers as the ``p v`` operand, bf16 (or fp16, fp32) out.

What differs from the 16-bit kernel, and why:
- v arrives transposed, ``(batch, kv_heads, dim, seq)``: Hopper's fp8 products need both
  operands K-major, and in ``p v`` K is the keys. Each 64-key box of vᵀ is ``dim`` rows of 64
  bytes, so the stage's vᵀ tile is swizzled in 64-byte spans: two boxes side by side make one
  128-key tile, each box one column chunk, as the 16-bit k tile's 128-byte chunks are.
- p stays where the q kᵀ accumulator left it. As an fp8 operand a thread must hold four
  adjacent keys where the accumulator gives it two, and moving them cost about 130 byte
  permutes and 24 shuffles a thread a step; instead the keys of vᵀ are reordered within each
  run of 32 (:func:`mma_key_order`, one pass over vᵀ before the launch) to match where p's
  registers say they are.
- p crosses the step loop's back edge in float32 and is rounded to e4m3 right where the ``p v``
  product takes it, four keys into one register (:func:`_to_e4m3`). Carried as e4m3, each byte
  was a value of its own at the loop's edge and was unpacked and packed again every step (about
  200 instructions a thread a step, 665 in all; now 457): 1.12-1.16x faster on the H200.
- one exp2 of p in every ``EXP2_PACK`` runs on the FMA pipe (a cubic, :func:`_mixed_exp2_asm`),
  the rest on the exp2 unit: in fp8 that unit has as much to do a step as the tensor cores.
- each step's ``p v`` accumulates into the output tile in the tensor cores, as the 16-bit
  kernel's does, though Hopper's fp8 products add with about 14 mantissa bits (why the Triton
  kernel starts each from zero, :mod:`kernels.fp8`). On the H200 at phi-3's shapes the output
  moved by 0.10-0.17% of its norm (the error against the float32 reference of the dequantised
  inputs stayed at 2.13%), and dropping the separate sum made the kernel 1-10% faster
  (kernels/PERF.md).
- p's row sums come from the tensor cores too: p times a (keys, 8) tile of ones, issued beside
  p v. Each step's sums start from zero and are added up in float32 (a running sum through the
  fp8 additions left the log-sum-exp 2% low). That takes 64 adds a thread a step off the
  consumers, whose instructions bound an fp8 step (the sums' reduction over the product's eight
  equal columns takes the shuffles the adds' did). The loader copies the ones in: the
  consumers' own stores of them were not what the products read (kernels/PERF.md, session 13).
- a split first step (a block only the upper 64 rows keep beside one only the lower 64 keep)
  is multiplied whole, masked: every consumer computes its 128 keys.
- two q buffers (an fp8 q tile is 16 KB, and the fp8 stages leave the room the 16-bit kernel's
  do not): the loader copies the next item's q, and then its first k and vᵀ tiles, while this
  item's last steps run, where with one buffer they waited for the item's last q kᵀ. With the
  output stores' wait moved to the next store, 1.00-1.04x on the H200 (kernels/PERF.md).
- the consumers do not take turns at the tensor cores (the 16-bit kernel's ping-pong): in fp8
  the products are about a third of a step's cycles and each consumer's own instructions bound
  it, so waiting for the other consumer's turn only delayed a consumer's next products. Without
  the waits, 1.03-1.05x on the H200 (kernels/PERF.md, session 11).
- 16-bit output leaves through a staging tile of its own per consumer and tensor-memory
  stores (an fp8 k stage is too small to stage 16-bit rows in, as the 16-bit kernel does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers
from .common import LN2, qk_scale, tile_plan, tma_compatible
from .fp8_softmax import P_SHIFT
from .fwd_ws import BLOCK_M, BOX_N, GLUON, MAX_REGS, _sm_count, work_items
from .layout import BlockLayout

if GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    from .fwd_ws import (
        _box_start,
        _read_item,
        _reinterpret,
        _step_keep,
        _tma_load,
        _tma_store,
        _work_item,
    )
    from .ws_mma import _issue_transposed, _issue_transposed_into

# The fp8 kernel's fixed shape, as configs name it: 128 query rows, 4 warps a consumer.
STAGE_CHOICES = (2, 3, 4)
BOX_CHOICES = (1, 2)  # 64-key boxes a step (block_n 64 or 128)
BOX = tl.constexpr(BOX_N)  # keys a tensor-memory copy of k or vᵀ holds

# p's exp2s: one in every EXP2_PACK on the FMA pipe, the rest on the exp2 unit (MUFU), which in
# fp8 is as busy as the tensor cores (kernels/PERF.md, session 9). On the FMA pipe: the integer
# part of x (clamped at -125, where p is 0 in e4m3 anyway) by the 1.5 * 2**23 rounding trick, a
# cubic fitted to 2**f on [-1/2, 1/2] (relative error 1.3e-4, against e4m3's 2**-4), and the
# integer added into the exponent bits.
EXP2_PACK = 16
_POLY_EXP2 = """{
    .reg .f32 t, j, f, p;
    .reg .b32 ti, pi;
    max.ftz.f32 t, %(x)s, 0fC2FA0000;
    add.rn.f32 j, t, 0f4B400000;
    sub.rn.f32 f, j, 0f4B400000;
    sub.rn.f32 f, t, f;
    fma.rn.f32 p, f, 0f3D6175D7, 0f3E781BDD;
    fma.rn.f32 p, p, f, 0f3F317922;
    fma.rn.f32 p, p, f, 0f3F7FFCB9;
    mov.b32 ti, j;
    shl.b32 ti, ti, 23;
    mov.b32 pi, p;
    add.s32 pi, pi, ti;
    mov.b32 %(y)s, pi;
    }"""


def _mixed_exp2_asm(pack: int) -> tuple[str, str]:
    """The inline assembly (and its constraints) of ``pack`` exp2s, the last on the FMA pipe."""
    lines = [f"ex2.approx.ftz.f32 ${i}, ${pack + i};" for i in range(pack - 1)]
    lines.append(_POLY_EXP2 % {"x": f"${2 * pack - 1}", "y": f"${pack - 1}"})
    return "\n".join(lines), ",".join(["=f"] * pack + ["f"] * pack)


_EXP2_ASM = tl.constexpr(_mixed_exp2_asm(EXP2_PACK)[0])
_EXP2_CONSTRAINTS = tl.constexpr(_mixed_exp2_asm(EXP2_PACK)[1])
_EXP2_PACK = tl.constexpr(EXP2_PACK)

if GLUON:
    @gluon.jit
    def _copy_k(desc, boxes_buf, ready, s, j, KvBlock, first_box, n_boxes, off_z, off_kvh,
                BLOCK_SIZE: gl.constexpr, BOXES: gl.constexpr):
        """Step ``j``'s k tile into stage ``s``: one copy of (64 keys, every dim) per box."""
        mbarrier.expect(ready, BOXES * desc.block_type.nbytes)
        for h in gl.static_range(BOXES):
            start_n = _box_start(KvBlock, first_box, j * BOXES + h, n_boxes, BLOCK_SIZE, BOX)
            _tma_load(desc, [off_z, off_kvh, start_n, 0], ready, boxes_buf.index(s * BOXES + h))

    @gluon.jit
    def _copy_vt(desc, boxes_buf, ready, s, j, KvBlock, first_box, n_boxes, off_z, off_kvh,
                 BLOCK_SIZE: gl.constexpr, BOXES: gl.constexpr):
        """Step ``j``'s vᵀ tile into stage ``s``: one copy of (every dim, 64 keys) per box."""
        mbarrier.expect(ready, BOXES * desc.block_type.nbytes)
        for h in gl.static_range(BOXES):
            start_n = _box_start(KvBlock, first_box, j * BOXES + h, n_boxes, BLOCK_SIZE, BOX)
            _tma_load(desc, [off_z, off_kvh, 0, start_n], ready, boxes_buf.index(s * BOXES + h))

    @gluon.jit
    def _load_partition(q_desc, k_desc, v_desc, ones_desc, q_smem, k_boxes, v_boxes, ones_box,
                        q_ready, q_empty, k_ready, v_ready, kv_empty, ones_ready, Items, Starts,
                        KvBlock, n_tiles, first_tile, num_heads, q_per_kv, q_offset,
                        BLOCK_M: gl.constexpr, BLOCK_SIZE: gl.constexpr, BOXES: gl.constexpr):
        """Loader warp: the tile of ones the consumers' row sums take first, then each work
        item's q tile into one of two buffers (once both consumers released the item two before
        it), then its k and vᵀ tiles through the stages. With two q buffers the next item's q
        and first tiles are on their way while this item's last steps run; with one, they
        waited for its last q kᵀ."""
        stages: gl.constexpr = k_ready.shape[0]
        n_sub: gl.constexpr = BLOCK_SIZE // BOX
        mbarrier.expect(ones_ready, ones_desc.block_type.nbytes)
        _tma_load(ones_desc, [0, 0, 0, 0], ones_ready, ones_box)
        g = 0  # kv steps issued so far by this program: the ring position
        i = 0  # work items so far: the q buffer (i % 2) and its phase (i // 2)
        pid = gl.program_id(0)
        for slot in range(gl.load(Starts + pid), gl.load(Starts + pid + 1)):
            w, first_entry, n_entries, _, _ = _read_item(Items, slot)
            tile, _, off_z, off_h, off_kvh = _work_item(w, n_tiles, first_tile, num_heads,
                                                        q_per_kv)
            b = i % 2
            mbarrier.wait(q_empty.index(b), ((i // 2) & 1) ^ 1)
            mbarrier.expect(q_ready.index(b), q_desc.block_type.nbytes)
            _tma_load(q_desc, [off_z, off_h, tile * BLOCK_M - q_offset, 0], q_ready.index(b),
                      q_smem.index(b))
            first_box = first_entry * n_sub
            n_boxes = n_entries * n_sub
            steps = gl.maximum(gl.cdiv(n_boxes, BOXES), 1)
            for j in range(0, steps):
                s = (g + j) % stages
                # Barriers start in the completed phase: the first pass over the stages runs free.
                mbarrier.wait(kv_empty.index(s), (((g + j) // stages) & 1) ^ 1)
                _copy_k(k_desc, k_boxes, k_ready.index(s), s, j, KvBlock, first_box, n_boxes,
                        off_z, off_kvh, BLOCK_SIZE, BOXES)
                _copy_vt(v_desc, v_boxes, v_ready.index(s), s, j, KvBlock, first_box, n_boxes,
                         off_z, off_kvh, BLOCK_SIZE, BOXES)
            g += steps
            i += 1

    @gluon.jit
    def _as_pv_operand(p, p_layout: gl.constexpr):
        """p (e4m3, in the q kᵀ accumulator's layout) as the p v operand, with no data movement:
        its columns reordered within each 32-key chunk as :func:`mma_key_order` stores vᵀ's
        keys. The accumulator gives each thread keys 2d+e+8c+16b of a chunk (lane d of four,
        registers e, c, b); the operand wants that thread's keys at 4d+2c+e+16b. Moving p there
        cost 128 byte permutes and 24 shuffles a thread a step; reordering the keys of vᵀ (once,
        in memory) costs none."""
        rows: gl.constexpr = p.shape[0]
        keys: gl.constexpr = p.shape[1]
        chunks: gl.constexpr = keys // 32
        # Key index bits, high to low: chunk, b, c, d (2 bits), e -> chunk, b, d, c, e.
        p = gl.reshape(p, [rows, chunks, 2, 2, 4, 2])
        p = gl.permute(p, (0, 1, 2, 4, 3, 5))
        return gl.convert_layout(gl.reshape(p, [rows, keys]), p_layout, assert_trivial=True)

    @gluon.jit
    def _to_e4m3(p):
        """float32 ``p`` rounded to e4m3, four at a time into one register."""
        return gl.inline_asm_elementwise(
            """{
            .reg .b16 lo, hi;
            cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;
            cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;
            mov.b32 $0, {lo, hi};
            }""",
            "=r,f,f,f,f", [p], dtype=gl.float8e4nv, is_pure=True, pack=4)

    @gluon.jit
    def _exp2_p(x):
        """exp2 of the scores' tile, EXP2_PACK at a time (see _mixed_exp2_asm)."""
        return gl.inline_asm_elementwise(_EXP2_ASM, _EXP2_CONSTRAINTS, [x], dtype=gl.float32,
                                         is_pure=True, pack=_EXP2_PACK)

    @gluon.jit
    def _softmax_step(qk, m_i, j, first_box, n_boxes, full_boxes, KvBlock, RowBits,
                      offs_m_abs, tile_first_block, row_end, seq_k, scale,
                      TILE_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, SUB_BLOCKS: gl.constexpr,
                      IS_CAUSAL: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr):
        """Mask step ``j``'s scores if any of its boxes needs it, then the online softmax with p
        scaled by ``2**P_SHIFT`` as the p v operand (its row sums come from the tensor cores,
        see the consumer); the masks are :mod:`kernels.fwd_ws`'s."""
        if (j + 1) * (TILE_N // BOX) > full_boxes:
            keep = _step_keep(j, first_box, n_boxes, KvBlock, RowBits, offs_m_abs,
                              tile_first_block, row_end, seq_k, TILE_N, BOX, BLOCK_SIZE,
                              SUB_BLOCKS, IS_CAUSAL, s_layout)
            qk = gl.where(keep, qk, float("-inf"))
        # _online_softmax_p8's arithmetic, with p's exp2s partly on the FMA pipe.
        m_new = gl.maximum(m_i, gl.max(qk, 1) * scale)
        p = _exp2_p(qk * scale - gl.expand_dims(m_new - P_SHIFT, 1))
        alpha = gl.exp2(m_i - m_new)
        return _as_pv_operand(p, p_layout), m_new, alpha

    @gluon.jit
    def _consumer_partition(q_smem, k_bufs, v_bufs, ones_smem, o_desc, o_boxes, o_bufs, q_ready,
                            q_empty, k_ready, v_ready, kv_empty, ones_ready, Items, Starts,
                            KvBlock, RowBits, Out, Lse,
                            QDescale, KDescale, VDescale,
                            stride_oz, stride_oh, stride_om, stride_ok,
                            stride_qdz, stride_qdh, stride_kdz, stride_kdh,
                            stride_vdz, stride_vdh,
                            n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k, qk_scale,
                            BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                            BLOCK_SIZE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                            RETURN_LSE: gl.constexpr, TMA_STORE: gl.constexpr,
                            HALF: gl.constexpr):
        """One consumer warp group: rows ``HALF * BLOCK_M / 2`` on of each work item's tile.
        Pipelined by one step as in :mod:`kernels.fwd_ws`: step j+1's q kᵀ and step j's p v
        are issued together, step j+1's softmax runs while p v does (but see PERF.md, session
        11: ptxas waits for p v first). Unlike there, the consumers do not take turns."""
        NUM_WARPS: gl.constexpr = 4
        ROWS: gl.constexpr = BLOCK_M // 2
        SUB_BLOCKS: gl.constexpr = BLOCK_M // BLOCK_SIZE if BLOCK_M > BLOCK_SIZE else 1
        TILE_N: gl.constexpr = k_bufs.shape[1]
        n_sub: gl.constexpr = BLOCK_SIZE // BOX
        stages: gl.constexpr = k_bufs.shape[0]
        # fp8 products take 32 keys (or dims) a step: the instruction's k.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, TILE_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        # p's row sums as p times a (keys, 8) tile of ones: eight equal columns. The p operand
        # over this product is p_layout's register for register (the conversion is free).
        l_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, 8, 32])
        p_sum_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout,
                                                         k_width=4)
        rows_l: gl.constexpr = gl.SliceLayout(1, l_layout)
        ones_op = ones_smem.permute((1, 0))
        no_sum = gl.zeros([ROWS, 8], gl.float32, l_layout)
        O_BOX_D: gl.constexpr = o_desc.block_type.shape[3]
        O_CHUNKS: gl.constexpr = HEAD_DIM // O_BOX_D
        q_offset = seq_k - seq_q
        g = 0  # kv steps consumed so far by this program: the ring position
        i = 0  # work items so far: the q buffer (i % 2) and its phase (i // 2)
        pid = gl.program_id(0)
        first_slot = gl.load(Starts + pid)
        last_slot = gl.load(Starts + pid + 1)
        next_item = _read_item(Items, first_slot)
        mbarrier.wait(ones_ready, 0)  # the loader's copy of the ones, once
        for slot in range(first_slot, last_slot):
            w, first_entry, n_entries, n_front, split = next_item
            next_item = _read_item(Items, gl.minimum(slot + 1, last_slot - 1))
            tile, off_zh, off_z, off_h, off_kvh = _work_item(w, n_tiles, first_tile, num_heads,
                                                             q_per_kv)
            # q's and k's descales ride in the softmax scale, v's in the normalisation.
            scale = (qk_scale * gl.load(QDescale + off_z * stride_qdz + off_h * stride_qdh)
                     * gl.load(KDescale + off_z * stride_kdz + off_kvh * stride_kdh))
            v_descale = gl.load(VDescale + off_z * stride_vdz + off_kvh * stride_vdh)
            row0 = tile * BLOCK_M + HALF * ROWS
            offs_m_abs = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            # A finite floor instead of -inf keeps exp2(m_i - m_new) defined for masked rows.
            m_i = gl.full([ROWS], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([ROWS], gl.float32, rows_l)
            acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
            tile_first_block = tile * BLOCK_M // BLOCK_SIZE
            if IS_CAUSAL:
                row_end = gl.minimum((tile + 1) * BLOCK_M, seq_k)
            else:
                row_end = seq_k
            first_box = first_entry * n_sub
            n_boxes = n_entries * n_sub
            full_boxes = n_front * n_sub
            steps = gl.maximum(gl.cdiv(n_boxes, TILE_N // BOX), 1)

            q_op = q_smem.index(i % 2).reshape([BLOCK_M, HEAD_DIM]).slice(HALF * ROWS, ROWS)
            mbarrier.wait(q_ready.index(i % 2), (i // 2) & 1)
            qk = _issue_transposed(q_op, k_bufs, k_ready, g, s_layout)
            qk = warpgroup_mma_wait(0, deps=(qk,))
            # A split pair (work_items moved it first and counts it unmasked) is masked whole.
            p, m_i, _alpha0 = _softmax_step(
                qk, m_i, 0, first_box, n_boxes, full_boxes * (1 - split), KvBlock, RowBits,
                offs_m_abs, tile_first_block, row_end, seq_k, scale, TILE_N, BLOCK_SIZE,
                SUB_BLOCKS, IS_CAUSAL, s_layout, p_layout)
            for j in range(1, steps):
                # p rides the back edge in float32 and is rounded where it is used: carried as
                # e4m3, its bytes were unpacked and packed again, 200 instructions a step.
                p8 = _to_e4m3(p)
                qk = _issue_transposed(q_op, k_bufs, k_ready, g + j, s_layout)
                # The step's row sums start from zero: the tensor cores add fp8 products with
                # about 14 bits, so only a step's own keys pass through those additions and the
                # running sum stays in float32 (a running sum there left the LSE 2% low).
                l = warpgroup_mma(gl.convert_layout(p8, p_sum_layout, assert_trivial=True),
                                  ones_op, no_sum, use_acc=False, is_async=True)
                acc = _issue_transposed_into(p8, v_bufs, v_ready, g + j - 1, acc)
                # wgmma groups retire in order: two left outstanding means q kᵀ is done.
                qk = warpgroup_mma_wait(2, deps=(qk,))
                p, m_i, alpha = _softmax_step(
                    qk, m_i, j, first_box, n_boxes, full_boxes, KvBlock, RowBits,
                    offs_m_abs, tile_first_block, row_end, seq_k, scale, TILE_N, BLOCK_SIZE,
                    SUB_BLOCKS, IS_CAUSAL, s_layout, p_layout)
                acc, l = warpgroup_mma_wait(0, deps=(acc, l))
                mbarrier.arrive(kv_empty.index((g + j - 1) % stages), count=1)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
                l_i = (l_i + gl.max(l, 1)) * gl.convert_layout(alpha, rows_l)
            mbarrier.arrive(q_empty.index(i % 2), count=1)  # every q kᵀ of this item is done
            p8 = _to_e4m3(p)
            l = warpgroup_mma(gl.convert_layout(p8, p_sum_layout, assert_trivial=True), ones_op,
                              no_sum, use_acc=False, is_async=True)
            acc = _issue_transposed_into(p8, v_bufs, v_ready, g + steps - 1, acc)
            acc, l = warpgroup_mma_wait(0, deps=(acc, l))
            mbarrier.arrive(kv_empty.index((g + steps - 1) % stages), count=1)
            l_i += gl.max(l, 1)

            # -- epilogue: the 2**P_SHIFT in acc and l_i cancels; v's descale comes in here --
            l_safe = gl.where(l_i == 0.0, 1.0, l_i)
            out = acc * gl.expand_dims(gl.convert_layout(v_descale / l_safe, rows_o), 1)
            if TMA_STORE:
                # Through this consumer's staging tile and tensor-memory stores (rows past the
                # end are not written): scattered stores from registers cost about a tenth of
                # the 16-bit forward at 8k (kernels/PERF.md). The last item's stores must have
                # read the tile before it is written again: waiting for that here, not right
                # after issuing them, keeps their read off this item's path.
                o_tile = o_bufs.index(HALF)
                tma.store_wait(0)
                o_tile.store(out.to(o_tile.dtype))
                fence_async_shared()
                for c in gl.static_range(O_CHUNKS):
                    _tma_store(o_desc, [off_z, off_h, row0 - q_offset, c * O_BOX_D],
                               o_boxes.index(HALF * O_CHUNKS + c))
            else:
                offs_m = row0 - q_offset + gl.arange(0, ROWS, layout=rows_o)
                offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
                row_ok = (offs_m >= 0) & (offs_m < seq_q)
                o_base = off_z.to(gl.int64) * stride_oz + off_h.to(gl.int64) * stride_oh
                o_ptrs = (Out + o_base + gl.expand_dims(offs_m.to(gl.int64) * stride_om, 1)
                          + gl.expand_dims(offs_d * stride_ok, 0))
                gl.store(o_ptrs, out.to(Out.dtype.element_ty),
                         mask=gl.expand_dims(row_ok, 1) & gl.expand_dims(offs_d < HEAD_DIM, 0))
            g += steps
            i += 1
            if RETURN_LSE:
                # Natural-log log-sum-exp; m_i is in log2 units and l_i carries 2**P_SHIFT.
                l_rows = gl.convert_layout(l_safe, gl.SliceLayout(1, s_layout))
                lse = (m_i + gl.log2(l_rows) - P_SHIFT) * LN2
                offs_m_s = offs_m_abs - q_offset
                gl.store(Lse + off_zh.to(gl.int64) * seq_q + offs_m_s, lse,
                         mask=(offs_m_s >= 0) & (offs_m_s < seq_q))
        if TMA_STORE:
            tma.store_wait(0)

    @gluon.jit
    def _sparse_attn_fwd_fp8_ws(q_desc, k_desc, v_desc, o_desc, ones_desc, Out, Lse, Items,
                                Starts, KvBlock, RowBits, QDescale, KDescale, VDescale,
                                stride_oz, stride_oh, stride_om, stride_ok,
                                stride_qdz, stride_qdh, stride_kdz, stride_kdh,
                                stride_vdz, stride_vdh,
                                num_heads, q_per_kv, seq_q, seq_k, n_tiles, first_tile, qk_scale,
                                BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                                BLOCK_SIZE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                                RETURN_LSE: gl.constexpr, BOXES: gl.constexpr,
                                STAGES: gl.constexpr, TMA_STORE: gl.constexpr):
        """Persistent: program ``p`` takes the work items in rows ``Starts[p]:Starts[p+1]`` of
        ``Items`` (:func:`kernels.fwd_ws.work_items`). With ``TMA_STORE`` the output leaves
        through ``o_desc`` (boxes of 64 rows and 128 bytes) from a staging tile per consumer;
        without, through ``Out``'s pointers (``o_desc`` unused). ``ones_desc`` copies the
        (8, keys) tile of ones the row sums are taken with: filled in place by the consumers'
        own stores, the tile they then read was not the one written (kernels/PERF.md, session
        13)."""
        # Two q buffers: work item i's q tile in buffer i % 2.
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape,
                                           q_desc.layout)
        # A stage's k tile is (keys, dim), its boxes stacked by rows; its vᵀ tile is (dim, keys),
        # its boxes side by side, each one 64-byte column chunk.
        k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BOXES * BOX, HEAD_DIM],
                                                                      k_desc.dtype)
        vt_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64,
                                                       element_bitwidth=8, rank=2)
        slots: gl.constexpr = STAGES * BOXES  # one 64-key copy each
        k_boxes = gl.allocate_shared_memory(k_desc.dtype, [slots] + k_desc.block_type.shape,
                                            k_desc.layout)
        v_boxes = gl.allocate_shared_memory(v_desc.dtype, [slots] + v_desc.block_type.shape,
                                            v_desc.layout)
        # Each consumer's 64 output rows, staged as 128-byte column chunks (one store box each).
        ROWS: gl.constexpr = BLOCK_M // 2
        k_bufs = _reinterpret(k_boxes, k_desc.dtype, [STAGES, BOXES * BOX, HEAD_DIM], k_layout)
        if TMA_STORE:
            o_chunks: gl.constexpr = HEAD_DIM // o_desc.block_type.shape[3]
            o_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM],
                                                                          o_desc.dtype)
            o_boxes = gl.allocate_shared_memory(o_desc.dtype,
                                                [2 * o_chunks] + o_desc.block_type.shape,
                                                o_desc.layout)
            o_bufs = _reinterpret(o_boxes, o_desc.dtype, [2, ROWS, HEAD_DIM], o_layout)
        else:  # the pointer stores: nothing staged (the k buffers stand in, unused)
            o_boxes = k_boxes
            o_bufs = k_bufs
        v_bufs = _reinterpret(v_boxes, v_desc.dtype, [STAGES, HEAD_DIM, BOXES * BOX], vt_layout)
        ones_box = gl.allocate_shared_memory(ones_desc.dtype, ones_desc.block_type.shape,
                                             ones_desc.layout)
        ones_smem = ones_box.reshape([8, BOXES * BOX])
        ones_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(ones_ready, count=1)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # both consumers release a q tile
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a stage

        # Constexprs written into each partition's tuple: a tuple variable would make them
        # runtime values.
        gl.warp_specialize([
            (_consumer_partition, (q_smem, k_bufs, v_bufs, ones_smem, o_desc, o_boxes, o_bufs,
                                   q_ready, q_empty, k_ready, v_ready, kv_empty, ones_ready,
                                   Items, Starts,
                                   KvBlock, RowBits, Out, Lse,
                                   QDescale, KDescale, VDescale,
                                   stride_oz, stride_oh, stride_om, stride_ok,
                                   stride_qdz, stride_qdh, stride_kdz, stride_kdh,
                                   stride_vdz, stride_vdh,
                                   n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k,
                                   qk_scale, BLOCK_M, HEAD_DIM, BLOCK_SIZE, IS_CAUSAL,
                                   RETURN_LSE, TMA_STORE, 0)),
            (_consumer_partition, (q_smem, k_bufs, v_bufs, ones_smem, o_desc, o_boxes, o_bufs,
                                   q_ready, q_empty, k_ready, v_ready, kv_empty, ones_ready,
                                   Items, Starts,
                                   KvBlock, RowBits, Out, Lse,
                                   QDescale, KDescale, VDescale,
                                   stride_oz, stride_oh, stride_om, stride_ok,
                                   stride_qdz, stride_qdh, stride_kdz, stride_kdh,
                                   stride_vdz, stride_vdh,
                                   n_tiles, first_tile, num_heads, q_per_kv, seq_q, seq_k,
                                   qk_scale, BLOCK_M, HEAD_DIM, BLOCK_SIZE, IS_CAUSAL,
                                   RETURN_LSE, TMA_STORE, 1)),
            (_load_partition, (q_desc, k_desc, v_desc, ones_desc, q_smem, k_boxes, v_boxes,
                               ones_box, q_ready, q_empty, k_ready, v_ready, kv_empty,
                               ones_ready, Items, Starts, KvBlock, n_tiles, first_tile,
                               num_heads, q_per_kv, seq_k - seq_q, BLOCK_M, BLOCK_SIZE, BOXES)),
        ], [4, 1], [240, 24])  # registers a thread: see kernels.fwd_ws.MAX_REGS


_GL_DTYPES = {torch.float8_e4m3fn: "float8e4nv", torch.bfloat16: "bfloat16",
              torch.float16: "float16"}


def _descriptor(x: torch.Tensor, rows: int, cols: int, swizzle: int | None = None
                ) -> "GluonDescriptor":
    """A descriptor of 4-D ``x`` (e4m3 or 16-bit) with ``(1, 1, rows, cols)`` boxes (the default
    swizzle for that box, or ``swizzle`` bytes)."""
    block = [1, 1, rows, cols]
    if swizzle is None:
        layout = gl.NVMMASharedLayout.get_default_for(block, getattr(gl, _GL_DTYPES[x.dtype]))
    else:
        layout = gl.NVMMASharedLayout(swizzle_byte_width=swizzle,
                                      element_bitwidth=8 * x.element_size(), rank=4)
    return GluonDescriptor(x, list(x.shape), list(x.stride()), block, layout)


@triton.jit
def _mma_key_order_copy(Src, Dst, kv_heads, dim, seq, padded, stride_z, stride_h, stride_d,
                        KEYS: tl.constexpr):
    """Keys ``[KEYS * pid(1), +KEYS)`` of row ``pid(0)`` (batch, kv head, dim) of ``Src`` to
    their reordered places in the contiguous ``Dst`` (rows of ``padded``), zeros past ``seq``."""
    row = tl.program_id(0)
    src = (Src + (row // (kv_heads * dim)).to(tl.int64) * stride_z
           + ((row // dim) % kv_heads).to(tl.int64) * stride_h
           + (row % dim).to(tl.int64) * stride_d)
    key = tl.program_id(1) * KEYS + tl.arange(0, KEYS)
    # Within a run of 32: bits b, c, d (2), e of the key go to b, d, c, e.
    pos = (key & ~31) | (key & 16) | ((key & 6) << 1) | ((key & 8) >> 2) | (key & 1)
    x = tl.load(src + key, mask=key < seq, other=0)
    tl.store(Dst + row.to(tl.int64) * padded + pos, x, mask=key < padded)


def mma_key_order(v_t: torch.Tensor) -> torch.Tensor:
    """``v_t`` ``(batch, kv_heads, dim, seq)``, keys contiguous, copied with its keys reordered
    within each run of 32 as the kernel's p operand holds them (key ``16b + 8c + 2d + e`` of a
    run at ``16b + 4d + 2c + e``; see ``_as_pv_operand``), the key axis zero-padded to a
    multiple of 32. One pass over vᵀ instead of moving p between threads every step."""
    batch, kv_heads, dim, seq = v_t.shape
    padded = -(-seq // 32) * 32
    out = torch.empty(batch, kv_heads, dim, padded, device=v_t.device, dtype=v_t.dtype)
    keys = 1024
    # Bytes (e4m3's zero is the byte 0).
    _mma_key_order_copy[(batch * kv_heads * dim, triton.cdiv(padded, keys))](
        v_t.view(torch.uint8), out.view(torch.uint8), kv_heads, dim, seq, padded,
        *v_t.stride()[:3], KEYS=keys)
    return out


_ONES: dict[tuple[torch.device, int], torch.Tensor] = {}


def _ones_tile(device: torch.device, keys: int) -> torch.Tensor:
    """The ``(1, 1, 8, keys)`` e4m3 tile of ones the kernel's row sums are taken with, made once
    per device and width. Inside a CUDA graph capture a tile not made yet is made for that
    graph alone: filled as the graph's first step on each replay, it would hold nothing outside
    it, so it is not kept."""
    key = (device, keys)
    if key in _ONES:
        return _ONES[key]
    tile = torch.ones(1, 1, 8, keys, device=device).to(torch.float8_e4m3fn)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _ONES[key] = tile
    return tile


_NOT_CUDA = "impl='gluon' runs on a CUDA GPU, not in the interpreter"


def _gpu_refusal(device: torch.device) -> str | None:
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "impl='gluon' runs on Hopper (compute capability 9.x) only"
    if not GLUON:
        return f"impl='gluon' needs Gluon, which triton {triton.__version__} does not have"
    return None


def unavailable(device: torch.device) -> str | None:
    """Why this kernel cannot run on ``device`` at all (None: it can)."""
    if device.type != "cuda":
        return _NOT_CUDA
    if not torch.cuda.is_available():
        return "impl='gluon' needs a CUDA GPU, and torch sees none"
    return _gpu_refusal(device)


def refusal(q: torch.Tensor, k: torch.Tensor, v_t: torch.Tensor, layout: BlockLayout
            ) -> str | None:
    """Why this kernel cannot take the call (None: it can); :mod:`kernels.fp8`'s Triton kernel
    takes the rest."""
    why = _gpu_refusal(q.device) if q.is_cuda else _NOT_CUDA
    if why:
        return why
    if q.shape[3] not in (64, 128):
        return f"impl='gluon' needs head_dim 64 or 128, got {q.shape[3]}"
    if layout.block_size % BOX_N or not (layout.block_size % BLOCK_M == 0
                                           or BLOCK_M % layout.block_size == 0):
        return (f"impl='gluon' needs a sparse block size that is a multiple of {BOX_N} and "
                f"divides or is a multiple of {BLOCK_M}, got {layout.block_size}")
    if not all(tma_compatible(x) for x in (q, k, v_t)):
        return "impl='gluon' needs q, k and v_t in strides tensor-memory copies can read"
    return None


def sparse_attention_fp8_ws(q: torch.Tensor, k: torch.Tensor, v_t: torch.Tensor,
                            layout: BlockLayout, descales: tuple[torch.Tensor, ...],
                            sm_scale: float, return_lse: bool = True,
                            out_dtype: torch.dtype = torch.bfloat16, stages: int = 2,
                            boxes: int = 2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`kernels.fp8.sparse_attention_fp8_fwd` for calls :func:`refusal` accepts:
    ``boxes`` 64-key copies per kv tile (a config's ``block_n // 64``), ``stages`` kv tiles in
    flight."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    plan = tile_plan(layout, BLOCK_M, seq_k)
    out = buffers.new_output((batch, seq_q, heads, head_dim), q, out_dtype).transpose(1, 2)
    lse = buffers.new_output((batch, heads, seq_q) if return_lse else (1,), q, torch.float32)
    first_tile = (seq_k - seq_q) // BLOCK_M
    work = work_items(layout, seq_k, first_tile, batch, heads, boxes, _sm_count(q.device),
                      q.device)
    q_descale, k_descale, v_descale = descales
    grid = (len(work.starts) - 1,)  # persistent: one program per SM
    # Tensor-memory stores skip rows past the end; rows before the first query only come with
    # a first tile that starts before it, which the pointer stores take.
    tma_store = (out_dtype in (torch.bfloat16, torch.float16) and (seq_k - seq_q) % BLOCK_M == 0
                 and tma_compatible(out))
    o_desc = (_descriptor(out, BLOCK_M // 2, 128 // out.element_size()) if tma_store
              else _descriptor(k, BOX_N, head_dim))
    _sparse_attn_fwd_fp8_ws[grid](
        _descriptor(q, BLOCK_M, head_dim), _descriptor(k, BOX_N, head_dim),
        _descriptor(mma_key_order(v_t), head_dim, BOX_N, swizzle=64), o_desc,
        _descriptor(_ones_tile(q.device, BOX_N * boxes), 8, BOX_N * boxes), out, lse,
        work.items, work.starts, work.kv_block, work.row_bits, q_descale, k_descale, v_descale,
        *out.stride(), *q_descale.stride(), *k_descale.stride(), *v_descale.stride(),
        heads, heads // kv_heads, seq_q, seq_k, plan.tiles - first_tile, first_tile,
        qk_scale(sm_scale),
        BLOCK_M=BLOCK_M, HEAD_DIM=head_dim, BLOCK_SIZE=layout.block_size,
        IS_CAUSAL=layout.causal, RETURN_LSE=return_lse, BOXES=boxes, STAGES=stages,
        TMA_STORE=tma_store, num_warps=4, maxnreg=MAX_REGS,
    )
    return out, (lse if return_lse else None)
