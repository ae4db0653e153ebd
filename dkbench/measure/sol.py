"""The speed of light of one row: the least time its FLOPs and its bytes allow on this GPU.

`row_bytes` is the fewest bytes the row's work must move through device memory; `sol_ms` puts
them, with the row's FLOPs (`dkbench.measure.metrics.flops`), against the GPU's own measured matrix rate
and copy bandwidth (`dkbench.measure.calibrate.Calibration`). A row measured faster than this is a wrong
FLOP or byte model (or a wrong timer), never a fast kernel.
"""

from __future__ import annotations

import math

import torch

from kernels import BlockLayout, layout_head_index

from ..spec.sweep import FP8, TRAINING_MODES, Case
from .modes import sequence_lengths


def kept_kv_tokens(case: Case, layout: BlockLayout, seq_k: int, seq_q: int) -> int:
    """Key (= value) tokens a sparse kernel must read for one sequence, summed over kv heads: per
    GQA group, the union over its query heads and over the query blocks that hold queries (the
    last ``seq_q`` of ``seq_k`` positions) of the kept kv blocks; a partial last block counts its
    tokens only. Blocks past ``ceil(seq_k / block_size)`` are clipped off the pattern."""
    bs = layout.block_size
    nb = math.ceil(seq_k / bs)
    first_q_block = (seq_k - seq_q) // bs
    device = layout.pattern.device  # slices stay where the pattern is: no copy per row
    head_of = layout_head_index(case.heads, case.kv_heads, layout.heads).to(device)
    kept = layout.pattern[:, first_q_block:nb, :nb].any(dim=1)  # (pattern_heads, nb)
    # Query head h belongs to kv head h // group: a kv block is read once for the whole group.
    union = kept[head_of].view(case.kv_heads, case.heads // case.kv_heads, nb).any(dim=1)
    tokens = torch.clamp(seq_k - torch.arange(nb, device=device) * bs, max=bs)  # keys per block
    return int((union.to(torch.int64) * tokens).sum())


def _kv_tokens(case: Case, layout: BlockLayout, computes: str, seq_k: int, seq_q: int) -> int:
    if computes == "pattern":
        return kept_kv_tokens(case, layout, seq_k, seq_q)
    return seq_k * case.kv_heads  # a dense kernel reads every key and value


def row_bytes(case: Case, layout: BlockLayout, computes: str, padded: bool = False) -> float:
    """The fewest bytes of device memory the row's work moves, at the case's dtype size.

    The rule: every input is read once and every output written once, at the case's dtype (fp8:
    e4m3 q, k, v, 1 byte, and a bf16 output, 2; in bwd and fwd_bwd dO comes in bf16 and the
    gradients go out in bf16, 2 bytes each); the softmax statistics (one float32 per query
    and head) are left out, as small.

    - fwd, prefill_varlen: q, k, v read, o written. prefill_varlen counts each sequence on its own
      length (`sequence_lengths`), as a training fwd of that length.
    - bwd: q, k, v, o and dO read; dq, dk, dv written.
    - fwd_bwd: the forward's q, k, v read and o written, then dO read and dq, dk, dv written; the
      backward's second reads of q, k, v and o are not counted (a fused step need not make them),
      so fwd_bwd moves the same bytes as bwd.
    - decode (one query per sequence): q read and o written, plus each sequence's cache: its length
      of keys and values per kv head.

    k and v (the caches, in decode) count every token for a dense provider (``computes ==
    "dense"``), and for a sparse one (``"pattern"``) only the kv blocks kept by the union over each
    GQA group (`kept_kv_tokens`; in decode, the row of the block that holds the one query).
    dk and dv are written in full: every element of a gradient is an output, zero or not.
    ``padded``, as in `dkbench.measure.metrics.computed_pairs`: a dense provider that runs on right-padded
    inputs moves every sequence at the padded length ``case.seqlen``.
    """
    itemsize = getattr(torch, case.dtype).itemsize
    # An fp8 row reads e4m3 q, k, v (1 byte each); its output, dO and gradients are bf16 (2).
    out_extra = 1 if case.dtype == FP8 else 0
    h, hkv, d = case.heads, case.kv_heads, case.head_dim
    if case.mode in TRAINING_MODES:
        q_tokens = case.batch * case.q_len * h  # q, o, dO and dq each
        kv_read = case.batch * _kv_tokens(case, layout, computes, case.seqlen, case.q_len)
        elements = 2 * q_tokens + 2 * kv_read  # q, o; k, v
        extra = q_tokens  # o
        if case.mode != "fwd":
            grads = 2 * q_tokens + 2 * case.batch * case.seqlen * hkv  # dO, dq; dk, dv
            elements += grads
            extra += grads
        return float((elements * itemsize + out_extra * extra) * d)
    pad = padded and computes == "dense"
    lengths = [case.seqlen if pad else n for n in sequence_lengths(case)]
    if case.mode == "decode":
        kv_read = sum(_kv_tokens(case, layout, computes, n, 1) for n in lengths)
        return float((2 * case.batch * h + 2 * kv_read) * d * itemsize)
    elements = sum(2 * n * h + 2 * _kv_tokens(case, layout, computes, n, n) for n in lengths)
    return float(elements * d * itemsize)


def sol_ms(flops: float, nbytes: float, calibration, dtype: str) -> float:
    """The speed of light in ms: the larger of the FLOPs at the calibrated matrix rate of ``dtype``
    (TFLOP/s) and the bytes at the calibrated copy bandwidth (1e9 B/s, read + written)."""
    memory_ms = nbytes / (calibration.copy_gbs * 1e9) * 1e3
    # No float32 tensor-core rate is calibrated (nor any dtype the calibration lacks): the bytes
    # alone bound such a row, a lower bound still, if a looser one.
    rate = None if dtype == "float32" else calibration.matmul_tflops.get(dtype)
    if not rate:
        return memory_ms
    return max(flops / (rate * 1e12) * 1e3, memory_ms)
