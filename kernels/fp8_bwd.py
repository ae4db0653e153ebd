"""Backward block-sparse attention over float8 e4m3 q, k, v: the gradients of the fp8 forward
(:mod:`kernels.fp8`) with respect to the dequantised inputs, in bfloat16.

The plan is the 16-bit backward's (:mod:`kernels.bwd`): a dq kernel over the forward's tile plan
and a dk/dv kernel over the pattern's column form, each recomputing the probabilities from the
forward's log-sum-exp. What runs in e4m3 and what does not, and why:

- ``q kᵀ`` on the stored e4m3 q and k, as the forward computed it, so the recomputed
  probabilities are the ones the forward normalised;
- dO is quantised per (batch, head), amax to 448, by a pre-pass that also writes dO transposed
  and ``delta = rowsum(dO' * O)`` from the quantised dO' (so dS is the exact softmax gradient for
  the dO the products see). ``dO vᵀ`` and ``pᵀ dO`` then run on e4m3 operands; p is taken
  scaled by ``2**P_SHIFT``, as the forward's (e4m3's normal range starts at 2^-6);
- ``dSᵀ q`` and ``dS k`` run in bfloat16: dS = P (dP - delta) is a difference of nearly equal
  terms in many entries, and e4m3's 3 mantissa bits would lose it; q and k are upcast from e4m3
  exactly (every e4m3 value is a bfloat16 one).

Hopper's fp8 tensor-core products need both operands K-major, and every tensor takes part in two
products with different K axes: the pre-pass writes the second layouts (dO transposed, and v
back in k's layout from the forward's transposed v_t). fp8 products accumulate with fewer
mantissa bits than float32 (about 14): each step's ``pᵀ dO`` starts from zero and joins the
float32 dv in an FMA, as the forward's ``p v`` does.

In the interpreter the kernels are compiled with ``EMULATE``: operands upcast to float32, p
rounded to e4m3 by :func:`kernels.fp8._round_e4m3` (the interpreter's own cast truncates).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import buffers
from .columns import column_plan
from .common import (
    LOG2E,
    _kv_step,
    _plan_row,
    _score_mask,
    _tile_program,
    _tile_rows,
    interpreting,
    padded_dim,
    qk_scale,
    tile_plan,
)
from .configs import LaunchConfig
from .fp8 import E4M3_MAX, FP8_DTYPE, _round_e4m3
from .fp8_softmax import P_SHIFT
from .layout import BlockLayout, is_int

__all__ = ["Fp8BwdConfigs", "dequantised_bf16", "dequantised_inputs", "fp8_bwd_default_configs",
           "fp8_bwd_config_problems", "quantised_do", "sparse_attention_fp8_bwd_views"]

# 2**-P_SHIFT: what takes the forward's shift back out of a product of shifted probabilities.
P_UNSCALE = tl.constexpr(2.0 ** -P_SHIFT.value)
# The key (or query) axis of a transposed e4m3 copy is padded to this many bytes, so that its
# other stride stays 16-byte aligned at any length.
_ALIGN = 16


class Fp8BwdConfigs(NamedTuple):
    """Launch configs of the fp8 backward's two kernels: ``dkdv`` (block_m kv rows a program,
    block_n query rows a step) and ``dq`` (block_m query rows a program, block_n keys a step)."""

    dkdv: LaunchConfig
    dq: LaunchConfig


def fp8_bwd_default_configs(device: torch.device, head_dim: int) -> Fp8BwdConfigs:
    """The configs where none is given. On a GPU: dk/dv over 64 kv rows with 32-query steps, dq
    over 64 query rows with 64-key steps, one warp group each, two stages: the fastest of seven
    pairs timed on an H200 at phi-3's pattern, 16k and 64k tokens (kernels/PERF.md, session 10).
    Head dims over 128 take one stage (shared memory). In the interpreter, the fp8 minimum of 32
    (numpy's temporaries)."""
    if device.type != "cuda":
        small = LaunchConfig(32, 32, 4, 1)
        return Fp8BwdConfigs(small, small)
    stages = 1 if head_dim > 128 else 2
    return Fp8BwdConfigs(LaunchConfig(64, 32, 4, stages), LaunchConfig(64, 64, 4, stages))


_INT_FIELDS = ("block_m", "block_n", "num_warps", "num_stages")


def fp8_bwd_config_problems(configs: Fp8BwdConfigs, block_size: int) -> list[str]:
    """Why ``configs`` cannot run the fp8 backward for this sparse block size (empty: they can).
    Both kernels' tiles are powers of two from 32 (fp8 products take k >= 32) to the block size
    (a step stays inside one kept block pair), Triton only."""
    if not isinstance(configs, Fp8BwdConfigs):
        raise TypeError(f"configs must be a kernels.Fp8BwdConfigs, got {type(configs).__name__}")
    problems = []
    for name, config in zip(Fp8BwdConfigs._fields, configs):
        if not isinstance(config, LaunchConfig):
            problems.append(f"{name}: expected a LaunchConfig, got {type(config).__name__}")
            continue
        # Was: Python's own TypeError from the comparisons below ("'<' not supported ...").
        not_ints = [f"{axis}={getattr(config, axis)!r}" for axis in _INT_FIELDS
                    if not is_int(getattr(config, axis))]
        if not_ints:
            problems.append(f"{name}: {', '.join(not_ints)} must be an int")
            continue
        if config.impl != "triton":
            problems.append(f"{name}: impl={config.impl!r}; the fp8 backward is Triton only")
        for axis in ("block_m", "block_n"):
            side = getattr(config, axis)
            if side < 32 or side & (side - 1) or side > block_size:
                problems.append(f"{name}: {axis}={side} must be a power of two from 32 to the "
                                f"sparse block size {block_size}")
        if config.num_warps not in (4, 8):
            problems.append(f"{name}: num_warps={config.num_warps} must be 4 or 8")
        if not 1 <= config.num_stages <= 4:
            problems.append(f"{name}: num_stages={config.num_stages} must be 1 to 4")
    return problems


# -- the dO pre-pass -------------------------------------------------------------------------------


@triton.jit
def _fp8_do_prepass(DO, Out, DO8, DO8T, Delta, DoDescale,
                    stride_doz, stride_doh, stride_dom, stride_dok,
                    stride_oz, stride_oh, stride_om, stride_ok,
                    stride_9z, stride_9h, stride_9m, stride_9k,
                    stride_tz, stride_th, stride_tk, stride_tm,
                    num_heads, seq_q, t_len,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                    EMULATE: tl.constexpr, REORDER: tl.constexpr):
    """A tile of dO rows of one (batch, head): dO / descale in e4m3, written in both layouts,
    and ``delta = rowsum(dO8 x descale x O)`` for its rows. dOᵀ's query axis is ``t_len`` long.
    With ``REORDER`` (the Gluon dk/dv kernel's, :mod:`kernels.fp8_bwd_ws`) dOᵀ's queries are
    reordered within each run of 32 (query ``16b + 8c + 2d + e`` of a run at ``16b + 4d + 2c +
    e``, where that kernel's p operand holds them: :func:`kernels.fp8_ws.mma_key_order`'s order)
    into a zeroed dOᵀ whose ``t_len`` is a multiple of 32."""
    off_zh = tl.program_id(1)
    off_z = (off_zh // num_heads).to(tl.int64)
    off_h = (off_zh % num_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    mask = (offs_m < seq_q)[:, None] & d_ok[None, :]
    descale = tl.load(DoDescale + off_zh)
    do = tl.load(DO + off_z * stride_doz + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dok, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_ok, mask=mask, other=0.0).to(tl.float32)
    scaled = tl.minimum(tl.maximum(do / descale, -E4M3_MAX), E4M3_MAX)
    if EMULATE:
        # Already an e4m3 value, which the interpreter's truncating cast keeps exactly.
        do8 = _round_e4m3(scaled).to(DO8.dtype.element_ty)
    else:
        do8 = scaled.to(DO8.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(DO8 + off_z * stride_9z + off_h * stride_9h + offs_m[:, None] * stride_9m
             + offs_d[None, :] * stride_9k, do8, mask=mask)
    if REORDER:
        # Rows reordered in registers (bits of a row within its run of 32: b, c, d (2), e -> b,
        # d, c, e), so the transposed store stays contiguous; rows past seq_q are zeros already.
        moved = tl.reshape(do8, [BLOCK_M // 32, 2, 2, 4, 2, BLOCK_D])
        do8_t = tl.trans(tl.reshape(tl.permute(moved, (0, 1, 3, 2, 4, 5)), [BLOCK_M, BLOCK_D]))
    else:
        do8_t = tl.trans(do8)
    tl.store(DO8T + off_z * stride_tz + off_h * stride_th + offs_d[:, None] * stride_tk
             + offs_m[None, :] * stride_tm, do8_t, mask=d_ok[:, None] & (offs_m < t_len)[None, :])
    delta = tl.sum(do8.to(tl.float32) * descale * o, axis=1)
    tl.store(Delta + off_zh.to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


def quantised_do(do: torch.Tensor, out: torch.Tensor, group: int = 1, reorder: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's dO pre-pass on ``(b, h, s_q, d)`` views: dO in e4m3 with one descale per
    (batch, ``group`` of consecutive heads), in both layouts (dOᵀ ``(b, h, d, s_q)`` with its
    query axis contiguous, reordered as :func:`_fp8_do_prepass` says with ``reorder``), and
    ``delta = rowsum(dO8 x descale x O)``. Returns ``(do8, do8_t, delta, descale)``, the
    descale ``(b, h // group)`` contiguous."""
    batch, heads, seq_q, head_dim = do.shape
    do_descale = _do_descale(do, group)
    do8 = buffers.new_output((batch, heads, seq_q, head_dim), do, FP8_DTYPE)
    if reorder:
        # The reordering moves rows within a run of 32: a zeroed dOᵀ of whole runs.
        t_len = -(-seq_q // 32) * 32
        do8_t = torch.zeros(batch, heads, head_dim, t_len, device=do.device, dtype=FP8_DTYPE)
    else:
        t_len = seq_q
        do8_t = _padded_transpose(do8)
    delta = buffers.new_output((batch, heads, seq_q), do, torch.float32)
    rows = 64
    per_head = do_descale.repeat_interleave(group, dim=1) if group > 1 else do_descale
    _fp8_do_prepass[(triton.cdiv(seq_q, rows), batch * heads)](
        do, out, do8, do8_t, delta, per_head.contiguous(), *do.stride(), *out.stride(),
        *do8.stride(), *do8_t.stride(), heads, seq_q, t_len, BLOCK_M=rows,
        BLOCK_D=max(32, padded_dim(head_dim)), HEAD_DIM=head_dim, EMULATE=interpreting(),
        REORDER=reorder, num_warps=4)
    return do8, do8_t, delta, do_descale


# -- the dk/dv kernel ------------------------------------------------------------------------------


@triton.jit
def _fp8_dkdv_inner(dk, dv, k, v, q_base, do_base, dot_base, lse_base, delta_base,
                    stride_qm, stride_qk, stride_dom, stride_dok, stride_tk, stride_tm,
                    QBlock, entry_start, entry_end, offs_n, q_offset, seq_q,
                    scale, dp_scale, dv_scale, ds_scale,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    EMULATE: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_M
    # One flat loop over (entry, query sub-tile), as the 16-bit dk/dv kernel walks it.
    for t in range(entry_start * N_SUB, entry_end * N_SUB):
        start_m_abs = tl.load(QBlock + t // N_SUB) * BLOCK_SIZE + (t % N_SUB) * BLOCK_M
        offs_m_abs = start_m_abs + tl.arange(0, BLOCK_M)
        offs_m = offs_m_abs - q_offset
        # Unmasked entries lie wholly among the queries: only the head dim's padding is masked.
        if MASKED:
            rows = (offs_m >= 0) & (offs_m < seq_q)
        else:
            rows = tl.full([BLOCK_M], 1, tl.int1)
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                    mask=rows[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dok,
                     mask=rows[:, None] & d_ok[None, :], other=0.0)
        dot = tl.load(dot_base + offs_d[:, None] * stride_tk + offs_m[None, :] * stride_tm,
                      mask=d_ok[:, None] & rows[None, :], other=0.0)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=rows, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        if EMULATE:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            dot = dot.to(tl.float32)
            q16 = q
        else:
            q16 = q.to(tl.bfloat16)
        # -- Pᵀ from the forward's LSE (log2 units, less P_SHIFT: p comes out in [0, 256]) --
        pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * scale - lse[None, :])
        if MASKED:
            keep = rows[None, :]
            if IS_CAUSAL:
                keep = keep & (offs_m_abs[None, :] >= offs_n[:, None])
            pt = tl.where(keep, pt, 0.0)
        # -- dV += Pᵀ dO: a product of its own, added in float32 --
        if EMULATE:
            pv = tl.dot(_round_e4m3(pt), tl.trans(dot))
        else:
            pv = tl.dot(pt.to(do.dtype, fp_downcast_rounding="rtne"), tl.trans(dot))
        dv = dv + pv * dv_scale
        # -- dSᵀ = Pᵀ (dPᵀ - delta), then dK += dSᵀ q in bfloat16 --
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt * dp_scale - delta[None, :]) * ds_scale
        if EMULATE:
            dk = tl.dot(dst, q16, dk)
        else:
            dk = tl.dot(dst.to(tl.bfloat16), q16, dk)
    return dk, dv


@triton.jit
def _fp8_bwd_dkdv(Q, K, V, DO8, DO8T, DK, DV, Lse, Delta, QDescale, KDescale, VDescale,
                  DoDescale, ColPtr, NFull, QBlock,
                  stride_qz, stride_qh, stride_qm, stride_qk,
                  stride_kz, stride_kh, stride_kn, stride_kk,
                  stride_vz, stride_vh, stride_vn, stride_vk,
                  stride_dz, stride_dh, stride_dm, stride_dk,
                  stride_tz, stride_th, stride_tk, stride_tm,
                  stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                  stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                  stride_qdz, stride_qdh, stride_kdz, stride_kdh, stride_vdz, stride_vdh,
                  num_heads, kv_heads, q_per_kv, heads_per_pattern, seq_q, seq_k, kv_blocks,
                  qk_scale, sm_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  EMULATE: tl.constexpr):
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    tl.static_assert(BLOCK_SIZE % BLOCK_M == 0)
    kv_tile_start = tl.program_id(0) * BLOCK_N
    off_zkv = tl.program_id(1)
    off_z = (off_zkv // kv_heads).to(tl.int64)
    off_kvh = (off_zkv % kv_heads).to(tl.int64)
    kv_block = kv_tile_start // BLOCK_SIZE
    q_offset = seq_k - seq_q
    offs_n = kv_tile_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < seq_k)[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + off_z * stride_kz + off_kvh * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kk, mask=kv_mask, other=0.0)
    v = tl.load(V + off_z * stride_vz + off_kvh * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vk, mask=kv_mask, other=0.0)
    if EMULATE:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    k_descale = tl.load(KDescale + off_z * stride_kdz + off_kvh * stride_kdh)
    v_descale = tl.load(VDescale + off_z * stride_vdz + off_kvh * stride_vdh)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # dk/dv of a kv head sum over the query heads of its group, each with its own descales.
    for g in range(0, q_per_kv):
        off_h = off_kvh * q_per_kv + g
        off_zh = off_z * num_heads + off_h
        q_descale = tl.load(QDescale + off_z * stride_qdz + off_h * stride_qdh)
        do_descale = tl.load(DoDescale + off_zh)
        row = (off_h // heads_per_pattern) * kv_blocks + kv_block
        entry_start = tl.load(ColPtr + row)
        entry_mid = entry_start + tl.load(NFull + row)
        entry_end = tl.load(ColPtr + row + 1)
        for masked in tl.static_range(2):
            dk, dv = _fp8_dkdv_inner(
                dk, dv, k, v, Q + off_z * stride_qz + off_h * stride_qh,
                DO8 + off_z * stride_dz + off_h * stride_dh,
                DO8T + off_z * stride_tz + off_h * stride_th,
                Lse + off_zh * seq_q, Delta + off_zh * seq_q,
                stride_qm, stride_qk, stride_dm, stride_dk, stride_tk, stride_tm,
                QBlock, entry_mid if masked else entry_start, entry_end if masked else entry_mid,
                offs_n, q_offset, seq_q, qk_scale * q_descale * k_descale,
                do_descale * v_descale, do_descale * P_UNSCALE, q_descale * P_UNSCALE,
                BLOCK_M, BLOCK_D, HEAD_DIM, BLOCK_SIZE, masked == 1, IS_CAUSAL, EMULATE)
    # -- epilogue: dS was taken w.r.t. the scaled scores --
    dk = dk * sm_scale
    tl.store(DK + off_z * stride_dkz + off_kvh * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkk, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_z * stride_dvz + off_kvh * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvk, dv.to(DV.dtype.element_ty), mask=kv_mask)


# -- the dq kernel ---------------------------------------------------------------------------------


@triton.jit
def _fp8_dq_inner(dq, q, do, lse, delta, k_base, v_base,
                  stride_kn, stride_kk, stride_vn, stride_vk,
                  KvBlock, RowBits, entry_start, entry_end,
                  offs_m_abs, tile_first_block, row_end, seq_k, scale, dp_scale,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, SUB_BLOCKS: tl.constexpr, MASKED: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, EMULATE: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    for t in range(entry_start * N_SUB, entry_end * N_SUB):
        e, _, offs_n, n_ok = _kv_step(KvBlock, t, seq_k, row_end, BLOCK_SIZE, BLOCK_N)
        if MASKED:
            kv_mask = n_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk,
                    mask=kv_mask, other=0.0)
        if EMULATE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            k16 = k
        else:
            k16 = k.to(tl.bfloat16)
        # -- P from the forward's LSE, then dS = P (dP - delta) --
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * scale - lse[:, None])
        if MASKED:
            keep = _score_mask(n_ok, offs_n, offs_m_abs, RowBits, e, tile_first_block,
                               BLOCK_SIZE, SUB_BLOCKS, IS_CAUSAL)
            p = tl.where(keep, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) * dp_scale - delta[:, None])
        if EMULATE:
            dq = tl.dot(ds, k16, dq)
        else:
            dq = tl.dot(ds.to(tl.bfloat16), k16, dq)
    return dq


@triton.jit
def _fp8_bwd_dq(Q, K, V, DO8, DQ, Lse, Delta, QDescale, KDescale, VDescale, DoDescale,
                RowPtr, NFull, KvBlock, RowBits,
                stride_qz, stride_qh, stride_qm, stride_qk,
                stride_kz, stride_kh, stride_kn, stride_kk,
                stride_vz, stride_vh, stride_vn, stride_vk,
                stride_dz, stride_dh, stride_dm, stride_dk,
                stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                stride_qdz, stride_qdh, stride_kdz, stride_kdh, stride_vdz, stride_vdh,
                num_heads, q_per_kv, heads_per_pattern, seq_q, seq_k, tiles, first_tile,
                qk_scale, sm_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                EMULATE: tl.constexpr):
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
    do = tl.load(DO8 + off_z * stride_dz + off_h64 * stride_dh + offs_m[:, None] * stride_dm
                 + offs_d[None, :] * stride_dk, mask=mask, other=0.0)
    if EMULATE:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    off_zh64 = off_zh.to(tl.int64)
    # log2 units; the forward's p is in [0, 1], which this kernel keeps (no e4m3 p here).
    lse = tl.load(Lse + off_zh64 * seq_q + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(Delta + off_zh64 * seq_q + offs_m, mask=row_ok, other=0.0)
    q_descale = tl.load(QDescale + off_z * stride_qdz + off_h * stride_qdh)
    k_descale = tl.load(KDescale + off_z * stride_kdz + off_kvh * stride_kdh)
    v_descale = tl.load(VDescale + off_z * stride_vdz + off_kvh * stride_vdh)
    do_descale = tl.load(DoDescale + off_zh64)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + off_z * stride_kz + off_kvh * stride_kh
    v_base = V + off_z * stride_vz + off_kvh * stride_vh
    entry_start, entry_mid, entry_end, tile_first_block, row_end = _plan_row(
        RowPtr, NFull, row, tile, seq_k, BLOCK_M, BLOCK_SIZE, IS_CAUSAL)
    for masked in tl.static_range(2):
        dq = _fp8_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kk,
                           stride_vn, stride_vk, KvBlock, RowBits,
                           entry_mid if masked else entry_start,
                           entry_end if masked else entry_mid, offs_m_abs, tile_first_block,
                           row_end, seq_k, qk_scale * q_descale * k_descale,
                           do_descale * v_descale, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE,
                           SUB_BLOCKS, masked == 1, IS_CAUSAL, EMULATE)
    dq = dq * (sm_scale * k_descale)
    tl.store(DQ + off_z * stride_dqz + off_h64 * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqk, dq.to(DQ.dtype.element_ty), mask=mask)


# -- bfloat16 copies of the dequantised inputs (the backward's "bf16" form) ---------------------


@triton.jit
def _round_bf16(x):
    """float32 ``x`` rounded to the nearest bfloat16 value, ties to even, as float32: the GPU's
    cast, for the interpreter (whose cast truncates). Finite values only."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fp8_dequantise(Src, Dst, Descale, stride_sz, stride_sh, stride_ss, stride_sd,
                    stride_dz, stride_dh, stride_ds, stride_dd, stride_ez, stride_eh,
                    heads, seq, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                    HEAD_DIM: tl.constexpr, EMULATE: tl.constexpr):
    """A tile of rows of one (batch, head) of e4m3 ``Src`` times its descale, into ``Dst``."""
    off_zh = tl.program_id(1)
    off_z = (off_zh // heads).to(tl.int64)
    off_h = (off_zh % heads).to(tl.int64)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_s < seq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    descale = tl.load(Descale + off_z * stride_ez + off_h * stride_eh)
    x = tl.load(Src + off_z * stride_sz + off_h * stride_sh + offs_s[:, None] * stride_ss
                + offs_d[None, :] * stride_sd, mask=mask, other=0.0).to(tl.float32) * descale
    if EMULATE:
        x = _round_bf16(x)
    tl.store(Dst + off_z * stride_dz + off_h * stride_dh + offs_s[:, None] * stride_ds
             + offs_d[None, :] * stride_dd, x.to(Dst.dtype.element_ty), mask=mask)


def dequantised_bf16(t8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """``t8 x descale`` (``(b, h, s, d)`` e4m3 of any strides, descale ``(b, h)`` float32) in
    bfloat16, a ``(b, h, s, d)`` view of a ``(b, s, h, d)`` tensor (the layout the 16-bit kernels
    copy fastest). Each value rounds once, by at most 2^-9 of itself. One pass, at copy speed."""
    b, h, s, d = t8.shape
    out = buffers.new_output((b, s, h, d), t8, torch.bfloat16).transpose(1, 2)
    rows = 64
    _fp8_dequantise[(triton.cdiv(s, rows), b * h)](
        t8, out, descale, *t8.stride(), *out.stride(), *descale.stride(), h, s,
        BLOCK_S=rows, BLOCK_D=padded_dim(d), HEAD_DIM=d, EMULATE=interpreting(), num_warps=4)
    return out


def dequantised_inputs(q8: torch.Tensor, k8: torch.Tensor, v_t: torch.Tensor,
                       descales: tuple[torch.Tensor, ...]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dequantised_bf16` of e4m3 q and k ``(b, h, s, d)`` and of v_t ``(b, hkv, d, s_k)``
    (v back in k's layout), with their descales ``(b, h)``, ``(b, hkv)``, ``(b, hkv)``."""
    q_descale, k_descale, v_descale = descales
    return (dequantised_bf16(q8, q_descale), dequantised_bf16(k8, k_descale),
            dequantised_bf16(v_t.transpose(2, 3), v_descale))


# -- launcher --------------------------------------------------------------------------------------


def _padded_transpose(t: torch.Tensor) -> torch.Tensor:
    """An empty ``(b, h, d, s)`` e4m3 tensor for ``t`` ``(b, h, s, d)``, its s axis contiguous and
    its d stride padded to :data:`_ALIGN` bytes."""
    b, h, s, d = t.shape
    padded = -(-s // _ALIGN) * _ALIGN
    return buffers.new_output((b, h, d, padded), t, FP8_DTYPE)[..., :s]


def _do_descale(do: torch.Tensor, group: int = 1) -> torch.Tensor:
    """amax / 448 of each (batch, ``group`` of consecutive heads) of dO ``(b, h, s, d)``,
    float32 ``(b, h // group)``, contiguous; 1 where dO is all zeros. No host sync: a dO holding
    inf or NaN gives NaN gradients, as in 16 bits."""
    amax = torch.linalg.vector_norm(do.unflatten(1, (do.shape[1] // group, group)), float("inf"),
                                    dim=(2, 3, 4)).to(torch.float32)
    # Tested for 0, not for > 0: a NaN amax must stay in the descale (NaN > 0 is False, and a
    # descale of 1 let the pre-pass's clamp turn NaN dO into 448, finite gradients).
    return torch.where(amax == 0, torch.ones_like(amax), amax / E4M3_MAX.value).contiguous()


def sparse_attention_fp8_bwd_views(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                   v_t: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                   layout: BlockLayout, descales: tuple[torch.Tensor, ...],
                                   sm_scale: float, configs: Fp8BwdConfigs,
                                   grad_dtype: torch.dtype = torch.bfloat16
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv on checked ``(batch, heads, seq, dim)`` views: e4m3 q ``(b, h, s_q, d)``, k
    ``(b, hkv, s_k, d)``, v_t ``(b, hkv, d, s_k)``; dO and the forward's output in any float
    dtype, its natural-log LSE ``(b, h, s_q)`` float32; float32 descales expanded to ``(b, h)``,
    ``(b, hkv)``, ``(b, hkv)``. Gradients of the dequantised inputs, ``grad_dtype``, each a
    ``(b, h, s, d)`` view of a ``(b, s, h, d)`` tensor."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    block_d = max(32, padded_dim(head_dim))
    emulate = interpreting()
    # -- the pre-pass: dO in e4m3 in both layouts, and delta --
    do8, do8_t, delta, do_descale = quantised_do(do, out)
    # v in k's layout (keys, dim), for the products whose K axis is the head dim.
    v = v_t.transpose(2, 3).contiguous()
    q_descale, k_descale, v_descale = descales
    descale_strides = (*q_descale.stride(), *k_descale.stride(), *v_descale.stride())
    constants = dict(BLOCK_D=block_d, HEAD_DIM=head_dim, BLOCK_SIZE=layout.block_size,
                     IS_CAUSAL=layout.causal, EMULATE=emulate)
    dq = buffers.new_output((batch, seq_q, heads, head_dim), q, grad_dtype).transpose(1, 2)
    dk = buffers.new_output((batch, seq_k, kv_heads, head_dim), q, grad_dtype).transpose(1, 2)
    dv = buffers.new_output((batch, seq_k, kv_heads, head_dim), q, grad_dtype).transpose(1, 2)
    scale = qk_scale(sm_scale)
    # -- dq, over the forward's tile plan --
    cfg = configs.dq
    plan = tile_plan(layout, cfg.block_m, seq_k)
    first_tile = (seq_k - seq_q) // cfg.block_m
    _fp8_bwd_dq[(plan.tiles - first_tile, batch * heads)](
        q, k, v, do8, dq, lse, delta, q_descale, k_descale, v_descale, do_descale,
        plan.row_ptr, plan.n_full, plan.kv_block, plan.row_bits,
        *q.stride(), *k.stride(), *v.stride(), *do8.stride(), *dq.stride(), *descale_strides,
        heads, heads // kv_heads, heads // layout.heads, seq_q, seq_k, plan.tiles, first_tile,
        scale, sm_scale, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constants)
    # -- dk and dv, over the column form; the LSE in log2 units, less P_SHIFT --
    cfg = configs.dkdv
    cols = column_plan(layout, seq_q, seq_k)
    lse2 = lse * LOG2E.value - P_SHIFT.value
    _fp8_bwd_dkdv[(triton.cdiv(seq_k, cfg.block_m), batch * kv_heads)](
        q, k, v, do8, do8_t, dk, dv, lse2, delta, q_descale, k_descale, v_descale, do_descale,
        cols.col_ptr, cols.n_full, cols.q_block,
        *q.stride(), *k.stride(), *v.stride(), *do8.stride(), *do8_t.stride(), *dk.stride(),
        *dv.stride(), *descale_strides,
        heads, kv_heads, heads // kv_heads, heads // layout.heads, seq_q, seq_k, cols.kv_blocks,
        scale, sm_scale, BLOCK_M=cfg.block_n, BLOCK_N=cfg.block_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constants)
    return dq, dk, dv
