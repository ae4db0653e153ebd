"""The fused backward (impl "fused" of the "bwd" kernel): dq, dk and dv from one pass over the
pattern's kept pairs, as FlashAttention-2/3's backward does.

The two-kernel backward (:mod:`kernels.bwd`) runs 7 matrix products per kept (query tile, kv
tile) pair: the dq kernel recomputes S = Q Kᵀ and dP = dO Vᵀ to take dQ (3), the dk/dv kernel
recomputes both again to take dV and dK (4). Here the dk/dv kernel, compiled with ``ATOMIC_DQ``,
also takes dQ += dS K in the same step and adds it into a float32 buffer with atomics: 5
products per pair, at the price of the atomic traffic on dq (a ``block_n x head_dim`` fp32 tile
per step; kernels/PERF.md). The kernel is ``kernels.bwd._bwd_dkdv`` itself, not a copy: the
step, the column plan and the masks are the same code. This module holds what runs around it:

- ``_bwd_fused_prep``: one program per (query tile, batch, head), before the kernel: writes
  ``delta = rowsum(dO * O)`` (which the two-kernel backward's dq kernel writes on its way, and
  every step of the fused kernel reads) and zeroes the dq buffer's rows;
- the launcher: the pre-pass, the fused kernel, then dq = sm_scale * buffer in the input dtype.

A fused config is the dk/dv kernel's ``LaunchConfig`` with ``impl="fused"`` (``block_m`` kv
rows per program, ``block_n`` query rows per step, as for impl "triton"); no dq kernel runs, so
a dq config is unused. Atomics add in no fixed order: dq may differ between runs in its last
bits (dk and dv do not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers
from .bwd import _row_delta, grad_like, kernel_constants, launch_dkdv
from .common import _tile_program, _tile_rows
from .configs import LaunchConfig
from .layout import BlockLayout

# Query rows per program of the pre-pass: it streams O and dO once, so any tile that keeps the
# loads wide does; 64 rows of head_dim 256 in 16-bit are 64 KB per program.
PREP_ROWS = 64


@triton.jit
def _bwd_fused_prep(Out, DO, Delta, DQAcc,
                    stride_oz, stride_oh, stride_om, stride_ok,
                    stride_doz, stride_doh, stride_dom, stride_dok,
                    stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                    num_heads, seq_q,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    # A (query tile, batch x head) grid over the seq_q query rows, counted from the first.
    tile, off_zh, off_z, off_h, _, _ = _tile_program(0, num_heads, 1, 1, 0)
    _, offs_m, offs_d, row_ok, d_ok = _tile_rows(tile, 0, seq_q, BLOCK_M, BLOCK_D, HEAD_DIM)
    mask = row_ok[:, None] & d_ok[None, :]
    off_h64 = off_h.to(tl.int64)
    # -- delta = rowsum(dO * O), as the two-kernel backward's dq kernel writes it --
    _row_delta(Out, DO, Delta, off_z, off_h64, off_zh, offs_m, offs_d, mask, row_ok, seq_q,
               stride_oz, stride_oh, stride_om, stride_ok, stride_doz, stride_doh, stride_dom,
               stride_dok)
    # -- zero the dq buffer here, not in a memset of its own: these rows pass through anyway --
    tl.store(DQAcc + off_z * stride_dqz + off_h64 * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqk, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), mask=mask)


def sparse_attention_bwd_fused(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                               layout: BlockLayout, sm_scale: float, config: LaunchConfig,
                               tma: bool = True
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients dq, dk, dv for ``(batch, heads, seq, dim)`` views (any strides) from the fused
    kernel launched with ``config`` (the dk/dv kernel's tiles; its ``impl`` is not read here).
    Same arguments, results and layouts as :func:`kernels.bwd.sparse_attention_bwd`, without a
    dq config. ``tma=False`` loads the q and dO tiles through pointers."""
    batch, heads, seq_q, _ = q.shape
    constants = kernel_constants(q, layout)
    dk, dv = grad_like(k), grad_like(v)
    delta = buffers.new_output((batch, heads, seq_q), q, torch.float32)
    # In the gradients' (batch, seq, heads, dim) memory order, so for fp32 inputs the buffer,
    # scaled in place, is dq itself.
    acc = buffers.new_output((batch, seq_q, heads, q.shape[3]), q, torch.float32).transpose(1, 2)

    _bwd_fused_prep[(triton.cdiv(seq_q, PREP_ROWS), batch * heads)](
        out, do, delta, acc, *out.stride(), *do.stride(), *acc.stride(), heads, seq_q,
        BLOCK_M=PREP_ROWS, BLOCK_D=constants["BLOCK_D"], HEAD_DIM=constants["HEAD_DIM"])
    launch_dkdv(do, q, k, v, lse, delta, dk, dv, layout, sm_scale, config, tma, dq_acc=acc)
    # The kernel adds dS K unscaled: one multiply per element here, not one per pair there.
    dq = acc if q.dtype == torch.float32 else grad_like(q)
    torch.mul(acc, sm_scale, out=dq)
    return dq, dk, dv
