"""Forward block-sparse attention on float8 e4m3 q, k, v: the Triton kernel, its launcher and
its config rules, and the public :func:`sparse_attention_fp8`.

The same tile plan, masks and grid as :mod:`kernels.fwd`'s Triton kernel (query tiles x batch x
heads; each program walks its tile's kept kv blocks, unmasked ones first). What differs:

- both products run on e4m3 operands with float32 accumulation: ``q kᵀ`` on the stored q and k,
  ``p v`` on the probabilities cast to e4m3. The descale factors are folded into the softmax
  scale (``q_descale x k_descale``) and into the normalisation (``v_descale``), never applied to
  a tile;
- the probabilities come out of the softmax scaled by ``2**P_SHIFT`` (256; the row sum carries the
  same factor, so it cancels in the normalisation and only the LSE takes it back out). e4m3's
  normal range ends at 2^-6, below which it keeps fewer mantissa bits, and its smallest value is
  2^-9: in [0, 1] every p under 2^-6 would lose precision and every p under 2^-10 would be 0;
  in [0, 256] only those under 2^-14 and 2^-18. FlashAttention-3 shifts by the same 8;
- v comes transposed, ``(batch, kv_heads, dim, seq)`` with the keys contiguous
  (:func:`kernels.quantize_fp8` writes it so): Hopper's fp8 tensor-core products need both
  operands K-major, and in ``p v`` K is the keys;
- ``block_n`` may be wider than the sparse block: a step then gathers ``block_n // block_size``
  kept blocks (pointer loads, each block's keys one contiguous run), so the phi-3 pattern's 64-key
  blocks still make 128-key steps. The unmasked blocks are taken in whole groups; what is left
  over joins the masked pass, with missing blocks masked out.

In the interpreter (``TRITON_INTERPRET=1``) the float32 -> e4m3 cast truncates and drops the
carry of its rounding, so the kernel is compiled with ``EMULATE``: the same tile loop with its
operands upcast to float32 and p rounded to the nearest e4m3 value by :func:`_round_e4m3`, which
is what the GPU's cast (round to nearest even) gives.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import buffers, fp8_ws, select
from .checks import (
    check_batch,
    check_config_type,
    check_heads,
    check_scale,
    check_seq_dim,
)
from .common import (
    LN2,
    _kv_step,
    _plan_row,
    _score_mask,
    _tile_program,
    _tile_rows,
    interpreting,
    padded_dim,
    qk_scale,
    tile_descriptor,
    tile_plan,
)
from .configs import LaunchConfig, launch_problems, query_tile_problems
from .fp8_softmax import P_SHIFT, _online_softmax_p8
from .fwd_tile import _normalise, _store_rows
from .layout import BlockLayout

__all__ = ["FP8_DTYPE", "GLUON_FP8_DEFAULT", "fp8_config_problems", "fp8_default_config",
           "fp8_gluon_unavailable", "fp8_triton_default", "resolve_fp8_config",
           "sparse_attention_fp8"]

FP8_DTYPE = torch.float8_e4m3fn
# e4m3's largest finite value and its smallest normal one.
E4M3_MAX = tl.constexpr(448.0)
E4M3_MIN_NORMAL = tl.constexpr(0.015625)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# -- jit helpers -----------------------------------------------------------------------------------


@triton.jit
def _round_e4m3(x):
    """``x`` (float32) rounded to the nearest e4m3 value, ties to even, saturating at 448, as
    float32: the GPU's cast, for the interpreter (whose cast is wrong)."""
    a = tl.minimum(tl.abs(x), E4M3_MAX)
    # Normal range: keep 3 of float32's 23 mantissa bits, rounding to nearest even on the bits
    # (a carry into the exponent is the right answer).
    bits = a.to(tl.uint32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & 0xFFF00000).to(tl.float32, bitcast=True)
    # Subnormals are multiples of 2^-9: adding 1.5 * 2^14 (whose float32 spacing is 2^-9) rounds
    # there, to nearest even, and taking it away again is exact.
    sub = (a + 24576.0) - 24576.0
    r = tl.minimum(tl.where(a < E4M3_MIN_NORMAL, sub, normal), E4M3_MAX)
    return tl.where(x < 0, -r, r)


@triton.jit
def _gather_step(KvBlock, e0, entry_end, seq_k, row_end,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """A step over entries ``[e0, e0 + BLOCK_N // BLOCK_SIZE)`` of a plan row, side by side:
    each key's position and which keys exist and some row may see (entries at or past
    ``entry_end`` pad the last step and are never seen). One scalar load per entry, not one
    per key."""
    GATHER: tl.constexpr = BLOCK_N // BLOCK_SIZE
    offs = tl.arange(0, BLOCK_N)
    which = offs // BLOCK_SIZE
    offs_n = offs % BLOCK_SIZE
    for g in tl.static_range(GATHER):
        block = tl.load(KvBlock + e0 + g, mask=e0 + g < entry_end, other=0)
        offs_n += tl.where(which == g, block * BLOCK_SIZE, 0)
    # Each block's keys are one aligned run: the loads stay 16-byte vectors.
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_SIZE), BLOCK_SIZE)
    return offs_n, (e0 + which < entry_end) & (offs_n < seq_k) & (offs_n < row_end)


@triton.jit
def _gather_mask(n_ok, e0, entry_end, offs_n, offs_m_abs, RowBits, tile_first_block,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SUB_BLOCKS: tl.constexpr,
                 IS_CAUSAL: tl.constexpr):
    """:func:`kernels.common._score_mask` for a gathered step, whose keys belong to entries
    ``e0, e0 + 1, ...``: each key takes its own entry's row bits."""
    keep = n_ok[None, :]
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m_abs[:, None])
    if SUB_BLOCKS > 1:
        which = tl.arange(0, BLOCK_N) // BLOCK_SIZE
        bits = tl.zeros([BLOCK_N], dtype=tl.int32)
        for g in tl.static_range(BLOCK_N // BLOCK_SIZE):
            bits += tl.where(which == g, tl.load(RowBits + e0 + g, mask=e0 + g < entry_end,
                                                 other=0), 0)
        shift = offs_m_abs // BLOCK_SIZE - tile_first_block
        keep = keep & (((bits[None, :] >> shift[:, None]) & 1) != 0)
    return keep


@triton.jit
def _load_kv_tile(ptrs, d_ok, n_ok, MASKED: tl.constexpr, PAD_D: tl.constexpr):
    """A ``(BLOCK_D, BLOCK_N)`` tile of kᵀ or vᵀ through pointers: keys no row sees (masked
    steps) and dims past head_dim (``PAD_D``) read as zeros."""
    if MASKED:
        return tl.load(ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    if PAD_D:
        return tl.load(ptrs, mask=d_ok[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _fp8_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kk, stride_vk, stride_vn,
                   k_desc, v_desc, desc_z, desc_h, KvBlock, RowBits, entry_lo, entry_hi,
                   offs_m_abs, tile_first_block, row_end, seq_k, scale,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, SUB_BLOCKS: tl.constexpr, MASKED: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, EMULATE: tl.constexpr, USE_TMA: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    GATHER: tl.constexpr = BLOCK_N // BLOCK_SIZE if BLOCK_N > BLOCK_SIZE else 1
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N if BLOCK_N < BLOCK_SIZE else 1
    if GATHER > 1:
        lo = 0
        hi = tl.cdiv(entry_hi - entry_lo, GATHER)
    else:
        lo = entry_lo * N_SUB
        hi = entry_hi * N_SUB
    for t in range(lo, hi):
        # -- the step's keys --
        if GATHER > 1:
            e = entry_lo + t * GATHER
            offs_n, n_ok = _gather_step(KvBlock, e, entry_hi, seq_k, row_end, BLOCK_SIZE,
                                        BLOCK_N)
            start_n = 0
        else:
            e, start_n, offs_n, n_ok = _kv_step(KvBlock, t, seq_k, row_end, BLOCK_SIZE, BLOCK_N)
        # -- load kᵀ and vᵀ, both (BLOCK_D, BLOCK_N) --
        if USE_TMA:
            # Boxes past seq_k or head_dim read zeros; the masked pass's score mask does the rest.
            kt = tl.trans(tl.reshape(k_desc.load([desc_z, desc_h, start_n, 0]),
                                     [BLOCK_N, BLOCK_D]))
            vt = tl.reshape(v_desc.load([desc_z, desc_h, 0, start_n]), [BLOCK_D, BLOCK_N])
        else:
            kt = _load_kv_tile(k_base + offs_d[:, None] * stride_kk + offs_n[None, :] * stride_kn,
                               d_ok, n_ok, MASKED, BLOCK_D != HEAD_DIM)
            vt = _load_kv_tile(v_base + offs_d[:, None] * stride_vk + offs_n[None, :] * stride_vn,
                               d_ok, n_ok, MASKED, BLOCK_D != HEAD_DIM)
        if EMULATE:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        # -- scores, mask, online softmax --
        qk = tl.dot(q, kt)
        if MASKED:
            if GATHER > 1:
                keep = _gather_mask(n_ok, e, entry_hi, offs_n, offs_m_abs, RowBits,
                                    tile_first_block, BLOCK_SIZE, BLOCK_N, SUB_BLOCKS, IS_CAUSAL)
            else:
                keep = _score_mask(n_ok, offs_n, offs_m_abs, RowBits, e, tile_first_block,
                                   BLOCK_SIZE, SUB_BLOCKS, IS_CAUSAL)
            qk = tl.where(keep, qk, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax_p8(qk, m_i, l_i, scale)
        # -- p (in e4m3) times v, added to acc in float32 --
        # Hopper's fp8 products accumulate with about 14 mantissa bits: carried through every
        # step (acc as the product's accumulator) the small late terms would be swamped. Each
        # step's product starts from zero and joins acc in the FMA that rescales it.
        if EMULATE:
            pv = tl.dot(_round_e4m3(p), tl.trans(vt))
        else:
            pv = tl.dot(p.to(vt.dtype, fp_downcast_rounding="rtne"), tl.trans(vt))
        acc = acc * alpha[:, None] + pv
    return acc, m_i, l_i


@triton.jit
def _sparse_attn_fwd_fp8(Q, K, Vt, KDesc, VDesc, Out, Lse, QDescale, KDescale, VDescale,
                         RowPtr, NFull, KvBlock, RowBits,
                         stride_qz, stride_qh, stride_qm, stride_qk,
                         stride_kz, stride_kh, stride_kn, stride_kk,
                         stride_vz, stride_vh, stride_vk, stride_vn,
                         stride_oz, stride_oh, stride_om, stride_ok,
                         stride_qdz, stride_qdh, stride_kdz, stride_kdh, stride_vdz, stride_vdh,
                         num_heads, q_per_kv, heads_per_pattern, seq_q, seq_k, tiles, first_tile,
                         qk_scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                         RETURN_LSE: tl.constexpr, EMULATE: tl.constexpr, USE_TMA: tl.constexpr):
    tl.static_assert((BLOCK_SIZE % BLOCK_N == 0) or (BLOCK_N % BLOCK_SIZE == 0))
    tl.static_assert((BLOCK_SIZE % BLOCK_M == 0) or (BLOCK_M % BLOCK_SIZE == 0))
    # Tensor-memory boxes hold one block's keys: a gathered step loads through pointers.
    tl.static_assert(not USE_TMA or BLOCK_N <= BLOCK_SIZE)
    GATHER: tl.constexpr = BLOCK_N // BLOCK_SIZE if BLOCK_N > BLOCK_SIZE else 1
    SUB_BLOCKS: tl.constexpr = BLOCK_M // BLOCK_SIZE if BLOCK_M > BLOCK_SIZE else 1
    tile, off_zh, off_z, off_h, off_kvh, row = _tile_program(first_tile, num_heads, q_per_kv,
                                                             heads_per_pattern, tiles)
    offs_m_abs, offs_m, offs_d, row_ok, d_ok = _tile_rows(tile, seq_k - seq_q, seq_q,
                                                          BLOCK_M, BLOCK_D, HEAD_DIM)
    # -- descales: q's and k's ride in the softmax scale, v's in the normalisation --
    q_descale = tl.load(QDescale + off_z * stride_qdz + off_h * stride_qdh)
    k_descale = tl.load(KDescale + off_z * stride_kdz + off_kvh * stride_kdh)
    v_descale = tl.load(VDescale + off_z * stride_vdz + off_kvh * stride_vdh)
    scale = qk_scale * q_descale * k_descale

    q_base = Q + off_z * stride_qz + off_h.to(tl.int64) * stride_qh
    k_base = K + off_z * stride_kz + off_kvh * stride_kh
    v_base = Vt + off_z * stride_vz + off_kvh * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if EMULATE:
        q = q.to(tl.float32)
    # A finite floor instead of -inf keeps exp2(m_i - m_new) defined for rows a tile masks fully.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    entry_start, entry_mid, entry_end, tile_first_block, row_end = _plan_row(
        RowPtr, NFull, row, tile, seq_k, BLOCK_M, BLOCK_SIZE, IS_CAUSAL)
    # Gathered steps take the unmasked entries in whole groups; the rest joins the masked pass.
    split = entry_start + (entry_mid - entry_start) // GATHER * GATHER
    for masked in tl.static_range(2):
        acc, m_i, l_i = _fp8_fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kk, stride_vk, stride_vn,
            KDesc, VDesc, off_z.to(tl.int32), off_kvh.to(tl.int32), KvBlock, RowBits,
            split if masked else entry_start, entry_end if masked else split,
            offs_m_abs, tile_first_block, row_end, seq_k, scale,
            BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, SUB_BLOCKS, masked == 1, IS_CAUSAL, EMULATE,
            USE_TMA)

    # -- epilogue: the 2**P_SHIFT in acc and l_i cancels; v's descale comes in here --
    out, l_safe = _normalise(acc, l_i)
    o_base = Out + off_z * stride_oz + off_h.to(tl.int64) * stride_oh
    _store_rows(out * v_descale, o_base, offs_m, offs_d, row_ok, d_ok, stride_om, stride_ok)
    if RETURN_LSE:
        # Natural-log log-sum-exp; m_i is in log2 units and l_i carries 2**P_SHIFT.
        lse = (m_i + tl.math.log2(l_safe) - P_SHIFT) * LN2
        tl.store(Lse + off_zh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)


# -- launch configs --------------------------------------------------------------------------------


def fp8_config_problems(config: LaunchConfig, block_size: int, head_dim: int) -> list[str]:
    """Why ``config`` cannot run the fp8 forward for this sparse block size and head_dim (empty
    if it can). Unlike the 16-bit forward's Triton kernel, ``block_n`` may be a multiple of the
    block size (a step gathers that many kept blocks); fp8 products take k >= 32, so ``block_n``
    is at least 32."""
    if config.impl == "gluon":
        return _gluon_problems(config, block_size, head_dim)
    problems = []
    if config.impl != "triton":
        problems.append(f"impl={config.impl!r}: the fp8 forward's implementations are 'triton' "
                        "and 'gluon'")
    problems += query_tile_problems(config, block_size)
    if config.block_n < 32 or config.block_n & (config.block_n - 1):
        problems.append(f"block_n={config.block_n} must be a power of two >= 32 (fp8 products "
                        "take k >= 32)")
    elif config.block_n > block_size and config.block_n // block_size > 8:
        problems.append(f"block_n={config.block_n} gathers more than 8 sparse blocks of "
                        f"{block_size}")
    return problems + launch_problems(config, head_dim)


# The Gluon fp8 forward's default: 128-key steps (two 64-key copies), three stages (its row
# sums from the tensor cores pay at three, not at two: kernels/PERF.md, sessions 13-14).
GLUON_FP8_DEFAULT = LaunchConfig(128, 128, 4, 3, "gluon")


def _gluon_problems(config: LaunchConfig, block_size: int, head_dim: int) -> list[str]:
    """Why ``config`` cannot run the Gluon fp8 forward (:mod:`kernels.fp8_ws`): 128 query rows
    on two 4-warp consumer groups, 64 or 128 keys a step (one or two 64-key copies), 2-4 stages."""
    problems = []
    if config.block_m != fp8_ws.BLOCK_M:
        problems.append(f"block_m={config.block_m} must be {fp8_ws.BLOCK_M} for impl='gluon'")
    if config.block_n not in (fp8_ws.BOX_N * b for b in fp8_ws.BOX_CHOICES):
        problems.append(f"block_n={config.block_n} must be 64 or 128 for impl='gluon'")
    if config.num_warps != 4:
        problems.append(f"num_warps={config.num_warps} must be 4 for impl='gluon' (4 warps a "
                        "consumer group)")
    if config.num_stages not in fp8_ws.STAGE_CHOICES:
        problems.append(f"num_stages={config.num_stages} must be 2, 3 or 4 for impl='gluon'")
    if block_size % fp8_ws.BOX_N or not (block_size % fp8_ws.BLOCK_M == 0
                                          or fp8_ws.BLOCK_M % block_size == 0):
        problems.append(f"impl='gluon' needs a sparse block size that is a multiple of 64 and "
                        f"divides or is a multiple of 128, got {block_size}")
    if head_dim not in (64, 128):
        problems.append(f"impl='gluon' needs head_dim 64 or 128, got {head_dim}")
    return problems


def fp8_gluon_unavailable(device: torch.device) -> str | None:
    """Why the Gluon fp8 kernel cannot run on ``device`` (None: it can); a Gluon config then
    runs the Triton kernel at :func:`fp8_triton_default`."""
    return fp8_ws.unavailable(device)


def fp8_default_config(device: torch.device, block_size: int, head_dim: int) -> LaunchConfig:
    """The fp8 forward's config where no tuned one applies: on Hopper with Gluon, and a block
    size and head_dim it takes, :data:`GLUON_FP8_DEFAULT`; else :func:`fp8_triton_default`."""
    if (fp8_gluon_unavailable(device) is None  # a visible Hopper GPU, and Gluon
            and not _gluon_problems(GLUON_FP8_DEFAULT, block_size, head_dim)):
        return GLUON_FP8_DEFAULT
    return fp8_triton_default(device, block_size, head_dim)


def fp8_triton_default(device: torch.device, block_size: int, head_dim: int) -> LaunchConfig:
    """The Triton fp8 kernel's config where no tuned one applies.

    On a GPU (from the registers and shared memory ptxas reports for sm_90a, not yet timed):
    64-row tiles on one warp group and 128-key steps (two 64-key blocks at phi-3's block size),
    two stages. That is 253 registers a thread and 72 KB of shared memory at d128, no spills: two
    programs per SM, which run out of step, so one's softmax can overlap the other's products
    (two warp groups of one 128-row program wait on each other's copies). Head dims over 128 take
    64-key steps on two warp groups, which do not spill. In the interpreter, small tiles
    (numpy's temporaries) at the fp8 minimum of 32 keys.
    """
    if device.type != "cuda":
        return LaunchConfig(32, 32, 4, 1)
    if head_dim > 128:
        return LaunchConfig(64, 64, 8, 2)
    return LaunchConfig(64, 128, 4, 2)


def resolve_fp8_config(q: torch.Tensor, layout: BlockLayout, seq_k: int
                       ) -> tuple[LaunchConfig, str]:
    """The config the fp8 forward launches with and where it came from: a tuned one from the
    cache or the shipped configs (kernel "fp8", keyed like every kernel's), else
    :func:`fp8_default_config` (``"default"``; also where a cached one cannot run this call).
    ``q`` carries the device and head_dim (its last dimension)."""
    head_dim = q.shape[-1]
    config, source = select.resolve_config("fp8", q, layout, seq_k)
    if source == "default" or fp8_config_problems(config, layout.block_size, head_dim):
        return fp8_default_config(q.device, layout.block_size, head_dim), "default"
    return config, source


# -- launcher --------------------------------------------------------------------------------------


def sparse_attention_fp8_fwd(q: torch.Tensor, k: torch.Tensor, v_t: torch.Tensor,
                             layout: BlockLayout, descales: tuple[torch.Tensor, ...],
                             sm_scale: float, config: LaunchConfig, return_lse: bool = True,
                             out_dtype: torch.dtype = torch.bfloat16, tma: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fp8 forward on checked views: q ``(batch, heads, seq_q, dim)``, k ``(batch,
    kv_heads, seq_k, dim)``, v_t ``(batch, kv_heads, dim, seq_k)``, all e4m3 (any strides), and
    float32 descales expanded to ``(batch, heads)``, ``(batch, kv_heads)``, ``(batch,
    kv_heads)``. Returns the output (a ``(batch, heads, seq_q, dim)`` view of a ``(batch, seq_q,
    heads, dim)`` tensor, ``out_dtype``) and the natural-log LSE ``(batch, heads, seq_q)``
    float32, or None. ``tma=False`` loads every tile through pointers."""
    if config.impl == "gluon":
        if tma and fp8_ws.refusal(q, k, v_t, layout) is None:
            return fp8_ws.sparse_attention_fp8_ws(
                q, k, v_t, layout, descales, sm_scale, return_lse, out_dtype,
                stages=config.num_stages, boxes=config.block_n // fp8_ws.BOX_N)
        # What the Gluon kernel cannot take (no Hopper GPU, strides it cannot copy) runs the
        # Triton kernel at its default.
        config = fp8_triton_default(q.device, layout.block_size, q.shape[3])
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    plan = tile_plan(layout, config.block_m, seq_k)
    out = buffers.new_output((batch, seq_q, heads, head_dim), q, out_dtype).transpose(1, 2)
    lse = buffers.new_output((batch, heads, seq_q) if return_lse else (1,), q, torch.float32)
    first_tile = (seq_k - seq_q) // config.block_m
    block_d = max(32, padded_dim(head_dim))  # fp8 products take k >= 32
    descs = None
    if tma and config.block_n <= layout.block_size:
        descs = (tile_descriptor(k, config.block_n, block_d),
                 tile_descriptor(v_t, block_d, config.block_n))
        descs = None if None in descs else descs
    q_descale, k_descale, v_descale = descales
    grid = (plan.tiles - first_tile, batch * heads)
    _sparse_attn_fwd_fp8[grid](
        q, k, v_t, *(descs or (k, v_t)), out, lse, q_descale, k_descale, v_descale,
        plan.row_ptr, plan.n_full, plan.kv_block, plan.row_bits,
        *q.stride(), *k.stride(), *v_t.stride(), *out.stride(),
        *q_descale.stride(), *k_descale.stride(), *v_descale.stride(),
        heads, heads // kv_heads, heads // layout.heads, seq_q, seq_k, plan.tiles, first_tile,
        qk_scale(sm_scale),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, HEAD_DIM=head_dim,
        BLOCK_SIZE=layout.block_size, IS_CAUSAL=layout.causal, RETURN_LSE=return_lse,
        EMULATE=interpreting(), USE_TMA=descs is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, (lse if return_lse else None)


# -- the public function ---------------------------------------------------------------------------


def _check_fp8_tensors(q: torch.Tensor, k: torch.Tensor, v_t: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v_t", v_t)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype != FP8_DTYPE:
            raise TypeError(f"{name} has dtype {t.dtype}; the fp8 forward takes "
                            "torch.float8_e4m3fn (kernels.quantize_fp8 makes it)")
        if t.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"sparse_attention_fp8 is the forward alone and {name} "
                                      "requires grad: train through "
                                      "sparse_attention_fp8_trainable (16- or 32-bit inputs), "
                                      "or take gradients with sparse_attention_fp8_bwd")
    if not (q.device == k.device == v_t.device):
        raise ValueError(f"q, k and v_t must be on one device, got {q.device}, {k.device}, "
                         f"{v_t.device}")
    if q.device.type == "cpu" and not interpreting():
        raise ValueError("q, k and v_t are CPU tensors: the Triton kernels need a GPU, or "
                         "TRITON_INTERPRET=1 set before triton is imported to run on the CPU")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {q.device}")


def check_fp8_shapes(q: torch.Tensor, k: torch.Tensor, v_t: torch.Tensor,
                     prefix: str = "") -> None:
    """q and k as ``(batch, heads, seq, dim)`` views and v_t ``(batch, kv_heads, dim, seq_k)``:
    a batch, one batch and head_dim, and v_t k's transpose. ``prefix`` names the arguments'
    owner in the messages (``x.`` for an Fp8Inputs)."""
    batch, _, _, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    check_batch(f"{prefix}q", batch)
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"{prefix}q and {prefix}k must share batch and head_dim, got "
                         f"{prefix}q {tuple(q.shape)} and {prefix}k {tuple(k.shape)} as "
                         "(batch, heads, seq, dim)")
    if tuple(v_t.shape) != (batch, kv_heads, dim, seq_k):
        raise ValueError(f"{prefix}v_t must be (batch, kv_heads, dim, seq_k) = "
                         f"{(batch, kv_heads, dim, seq_k)}, got {tuple(v_t.shape)}")


def _expand_descale(name: str, d: torch.Tensor | None, batch: int, heads: int,
                    device: torch.device) -> torch.Tensor:
    """A descale as float32 ``(batch, heads)`` (a broadcast view): None is 1; a tensor may be
    ``(1,)``, ``(heads,)`` or ``(batch, heads)`` (anything that broadcasts to that)."""
    if d is None:
        return torch.ones(1, device=device, dtype=torch.float32).expand(batch, heads)
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(d).__name__}")
    if d.device != device:
        raise ValueError(f"{name} is on {d.device}, the inputs on {device}")
    if d.dim() > 2 or not d.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape (1,), ({heads},) or "
                         f"({batch}, {heads}), got {d.dtype} {tuple(d.shape)}")
    # On the host the rule costs nothing to check; on a GPU it would wait for the device.
    if d.device.type == "cpu" and not bool((torch.isfinite(d) & (d > 0)).all()):
        bad = d[~(torch.isfinite(d) & (d > 0))].flatten()[0].item()
        raise ValueError(f"{name} must be finite and positive, got {bad}")
    try:
        return d.to(torch.float32).expand(batch, heads)
    except RuntimeError:
        raise ValueError(f"{name} has shape {tuple(d.shape)}; expected (1,), ({heads},) or "
                         f"({batch}, {heads})") from None


def sparse_attention_fp8(q: torch.Tensor, k: torch.Tensor, v_t: torch.Tensor,
                         layout: BlockLayout, q_descale: torch.Tensor | None = None,
                         k_descale: torch.Tensor | None = None,
                         v_descale: torch.Tensor | None = None, sm_scale: float | None = None,
                         seq_dim: int = 1, return_lse: bool = False,
                         config: LaunchConfig | None = None,
                         out_dtype: torch.dtype = torch.bfloat16):
    """Block-sparse attention over float8 e4m3 inputs, forward only: ``softmax(sm_scale x (q x
    q_descale)(k x k_descale)ᵀ + mask)(v x v_descale)``, the probabilities rounded to e4m3 for
    the product with v, float32 accumulation.

    q: ``(batch, seq_q, heads, dim)`` (``seq_dim=1``) or ``(batch, heads, seq_q, dim)``
    (``seq_dim=2``); k the same with ``seq_k >= seq_q`` and ``kv_heads``; v_t always ``(batch,
    kv_heads, dim, seq_k)``, keys contiguous (what :func:`kernels.quantize_fp8` returns; other
    strides run, slower). Queries are the last ``seq_q`` of the ``seq_k`` positions. Descales:
    float32 ``(1,)``, one per head (``(heads,)`` for q, ``(kv_heads,)`` for k and v) or per
    batch and head; None is 1; they must be positive. ``sm_scale`` defaults to ``1/sqrt(dim)``.
    Returns the output in q's layout and ``out_dtype`` (bfloat16), and with ``return_lse`` the
    natural-log log-sum-exp ``(batch, heads, seq_q)`` float32. ``config`` overrides the looked-up
    launch config (its rules: :func:`fp8_config_problems`).
    """
    _check_fp8_tensors(q, k, v_t)
    check_seq_dim(seq_dim)
    check_scale(sm_scale)
    check_config_type("config", config)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16, torch.float16 or torch.float32, "
                        f"got {out_dtype}")
    if seq_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    check_fp8_shapes(q, k, v_t)
    check_heads(heads, kv_heads, dim, layout)
    layout.check_seqlen(seq_k, seq_q)
    descales = (_expand_descale("q_descale", q_descale, batch, heads, q.device),
                _expand_descale("k_descale", k_descale, batch, kv_heads, q.device),
                _expand_descale("v_descale", v_descale, batch, kv_heads, q.device))
    layout = layout.to(q.device)
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    if config is None:
        config = resolve_fp8_config(q, layout, seq_k)[0]
    problems = fp8_config_problems(config, layout.block_size, dim)
    if problems:
        raise ValueError("invalid launch config " + config.short() + ": " + "; ".join(problems))
    out, lse = sparse_attention_fp8_fwd(q, k, v_t, layout, descales, scale, config, return_lse,
                                        out_dtype)
    if seq_dim == 1:
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
