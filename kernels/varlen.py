"""Forward over sequences of different lengths in one launch: packed (cu_seqlens), left-padded
batches, and chunked prefill (a chunk of queries at the end of a longer key sequence).

Each sequence's pattern starts at its own first token. The program grid is (query tiles of the
longest sequence, sequences * heads); programs past their sequence's tiles exit at once. A tile's
work is the forward kernel's (:mod:`kernels.fwd_tile`); only the sequence bookkeeping differs.
The sequence table (:class:`VarlenSequences`) is built once per batch shape and sizes the grid
from host numbers, so a launch with one reads nothing back and can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from . import buffers
from .common import _tile_rows, build_tile_plan, dot_fp32, padded_dim, qk_scale
from .configs import LaunchConfig
from .fwd_tile import _attn_fwd_tile, _normalise, _store_rows
from .layout import BlockLayout


@dataclass(frozen=True)
class VarlenSequences:
    """Where each sequence of a batch lives: batch index, first row and length, for queries and
    keys; once as the int32 table the kernel reads (on the inputs' device), once as host numbers
    that size the grid. Built once per batch shape, it lets a launch read nothing back.
    """

    meta: torch.Tensor  # int32 (num_seqs, 5): batch, q_start, q_len, k_start, k_len
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    max_q: int
    max_k: int
    rows_q: int  # rows the queries reach (a packed batch's total_q)
    rows_k: int
    # Query tiles per BLOCK_M, worked out on first use (the grid of every later launch).
    _tiles: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def count(self) -> int:
        return len(self.q_lens)

    def tiles(self, block_m: int) -> int:
        """Query tiles of the sequence that needs the most: its queries end at its keys' end."""
        if block_m not in self._tiles:
            self._tiles[block_m] = max(-(-k // block_m) - (k - q) // block_m
                                       for q, k in zip(self.q_lens, self.k_lens))
        return self._tiles[block_m]


def sequence_table(batch: list[int], q_start: list[int], q_len: list[int], k_start: list[int],
                   k_len: list[int], device: torch.device) -> VarlenSequences:
    """The table of checked per-sequence numbers, its tensor on ``device`` (one copy)."""
    meta = torch.tensor(list(zip(batch, q_start, q_len, k_start, k_len)), dtype=torch.int32,
                        device=device).reshape(-1, 5)
    return VarlenSequences(meta, tuple(q_len), tuple(k_len), max(q_len), max(k_len),
                           max(s + n for s, n in zip(q_start, q_len)),
                           max(s + n for s, n in zip(k_start, k_len)))


def varlen_plan(layout: BlockLayout, block_m: int, max_k: int):
    """The tile plan for the longest sequence. Bidirectional rows of a shorter sequence may keep
    kv blocks past its end, so there every entry takes the masked path (bounds checked)."""
    def build():
        plan = build_tile_plan(layout, block_m, max_k)
        if not layout.causal:
            plan = type(plan)(plan.row_ptr, torch.zeros_like(plan.n_full), plan.kv_block,
                              plan.row_bits, plan.tiles)
        return plan
    return layout.cached(("varlen_plan", block_m, max_k, layout.pattern.device), build)


@triton.jit
def _sparse_attn_fwd_varlen(Q, K, V, Out, SeqMeta,
                            RowPtr, NFull, KvBlock, RowBits,
                            stride_qz, stride_qh, stride_qm, stride_qk,
                            stride_kz, stride_kh, stride_kn, stride_kk,
                            stride_vz, stride_vh, stride_vn, stride_vk,
                            stride_oz, stride_oh, stride_om, stride_ok,
                            num_heads, q_per_kv, heads_per_pattern, tiles, qk_scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            IS_CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr):
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    tl.static_assert((BLOCK_SIZE % BLOCK_M == 0) or (BLOCK_M % BLOCK_SIZE == 0))
    seq = tl.program_id(1) // num_heads
    off_h = tl.program_id(1) % num_heads
    # -- this program's sequence --
    meta = SeqMeta + seq * 5
    off_z = tl.load(meta).to(tl.int64)
    q_start = tl.load(meta + 1).to(tl.int64)
    seq_q = tl.load(meta + 2)
    k_start = tl.load(meta + 3).to(tl.int64)
    seq_k = tl.load(meta + 4)
    q_offset = seq_k - seq_q
    tile = tl.program_id(0) + q_offset // BLOCK_M
    if tile * BLOCK_M < seq_k:
        off_kvh = (off_h // q_per_kv).to(tl.int64)
        row = (off_h // heads_per_pattern) * tiles + tile
        offs_m_abs, offs_m, offs_d, row_ok, d_ok = _tile_rows(tile, q_offset, seq_q,
                                                              BLOCK_M, BLOCK_D, HEAD_DIM)
        q_base = Q + off_z * stride_qz + q_start * stride_qm + off_h.to(tl.int64) * stride_qh
        k_base = K + off_z * stride_kz + k_start * stride_kn + off_kvh * stride_kh
        v_base = V + off_z * stride_vz + k_start * stride_vn + off_kvh * stride_vh
        # Pointer loads (USE_TMA False): the descriptor arguments K, V, 0, 0 are never read.
        acc, _, l_i = _attn_fwd_tile(q_base, k_base, v_base, stride_qm, stride_qk,
                                       stride_kn, stride_kk, stride_vn, stride_vk, K, V, 0, 0,
                                       RowPtr, NFull, KvBlock, RowBits, row, tile,
                                       offs_m_abs, offs_m, offs_d, row_ok, d_ok, seq_k, qk_scale,
                                       BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, IS_CAUSAL,
                                       DOT_FP32, False)
        out, _ = _normalise(acc, l_i)
        o_base = Out + off_z * stride_oz + q_start * stride_om + off_h.to(tl.int64) * stride_oh
        _store_rows(out, o_base, offs_m, offs_d, row_ok, d_ok, stride_om, stride_ok)


def sparse_attention_fwd_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                seqs: VarlenSequences, layout: BlockLayout, sm_scale: float,
                                config: LaunchConfig, out: torch.Tensor) -> torch.Tensor:
    """Launch on checked ``(batch, seq, heads, dim)`` tensors (packed inputs have batch 1);
    writes the rows of every sequence into ``out`` (same shape as q) and returns it. Reads
    nothing back from the device: the grid comes from the table's host numbers."""
    heads, head_dim = q.shape[2], q.shape[3]
    kv_heads = k.shape[2]
    plan = varlen_plan(layout, config.block_m, seqs.max_k)
    grid = (seqs.tiles(config.block_m), seqs.count * heads)
    _sparse_attn_fwd_varlen[grid](
        q, k, v, out, seqs.meta,
        plan.row_ptr, plan.n_full, plan.kv_block, plan.row_bits,
        *bhsd(q), *bhsd(k), *bhsd(v), *bhsd(out),
        heads, heads // kv_heads, heads // layout.heads, plan.tiles,
        qk_scale(sm_scale),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_D=padded_dim(head_dim), HEAD_DIM=head_dim,
        BLOCK_SIZE=layout.block_size, IS_CAUSAL=layout.causal,
        DOT_FP32=dot_fp32(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def bhsd(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a ``(batch, seq, heads, dim)`` tensor in the (batch, heads, seq, dim) order the
    kernel indexes."""
    return t.stride(0), t.stride(2), t.stride(1), t.stride(3)


def new_varlen_output(q: torch.Tensor, padded: bool) -> torch.Tensor:
    """Packed outputs are fully written; padded rows of a padded batch are zero, not garbage."""
    if padded:
        return torch.zeros_like(q, memory_format=torch.contiguous_format)
    return buffers.new_output(tuple(q.shape), q, q.dtype)

