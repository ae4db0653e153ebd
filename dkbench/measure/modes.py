"""What each benchmark mode feeds a provider, and the reference it is checked against.

Training modes (`fwd`, `bwd`, `fwd_bwd`) pass ``(q, k, v)`` as ``(batch, heads, seq, dim)``.
Inference modes give every sequence its own length: the spec's `lengths`, or drawn (seeded) from
``[seqlen * (1 - length_spread), seqlen]`` with the first sequence at ``seqlen``:

- `prefill_varlen`: `VarlenInputs`, the packed sequences plus a right-padded copy for dense
  baselines; outputs are compared packed, ``(total, heads, dim)``.
- `decode`: `DecodeInputs`, one new token per sequence and a KV cache holding each sequence's
  past (the new token included); outputs ``(batch, heads, dim)``.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from kernels import BlockLayout, dense_layout, reference_attention

from ..spec.sweep import TRAINING_MODES, Case


class VarlenInputs(NamedTuple):
    q: torch.Tensor  # (total, heads, dim)
    k: torch.Tensor  # (total, kv_heads, dim)
    v: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 (batch + 1,)
    q_pad: torch.Tensor  # (batch, heads, max_len, dim), right-padded
    k_pad: torch.Tensor  # (batch, kv_heads, max_len, dim)
    v_pad: torch.Tensor
    lengths: tuple[int, ...]


class DecodeInputs(NamedTuple):
    q: torch.Tensor  # (batch, heads, dim)
    k_cache: torch.Tensor  # (batch, max_len, kv_heads, dim)
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor  # int32 (batch,)
    lengths: tuple[int, ...]


def sequence_lengths(case: Case) -> tuple[int, ...]:
    """Per-sequence lengths of an inference case: the spec's `lengths`, or drawn reproducibly."""
    if case.lengths:
        return case.lengths
    rng = random.Random(f"{case.seed}|{case.case_id}")
    low = max(1, round(case.seqlen * (1.0 - case.length_spread)))
    return (case.seqlen, *(rng.randint(low, case.seqlen) for _ in range(case.batch - 1)))


def make_inputs(case: Case, device: torch.device, seed: int) -> tuple:
    """Fresh random inputs (never zeros) for the case's mode."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    h, hkv, d = case.heads, case.kv_heads, case.head_dim
    if case.mode in TRAINING_MODES:
        grad = case.mode != "fwd"
        return tuple(t.requires_grad_(grad) for t in (
            randn(case.batch, h, case.q_len, d), randn(case.batch, hkv, case.seqlen, d),
            randn(case.batch, hkv, case.seqlen, d)))
    lengths = sequence_lengths(case)
    if case.mode == "decode":
        lens = torch.tensor(lengths, device=device, dtype=torch.int32)
        return DecodeInputs(randn(case.batch, h, d), randn(case.batch, case.seqlen, hkv, d),
                            randn(case.batch, case.seqlen, hkv, d), lens, lengths)
    total = sum(lengths)
    q, k, v = randn(total, h, d), randn(total, hkv, d), randn(total, hkv, d)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device,
                      dtype=torch.int32)
    return VarlenInputs(q, k, v, cu, *(_pad(t, cu, lengths, case.seqlen) for t in (q, k, v)),
                        lengths)


def _pad(packed: torch.Tensor, cu: torch.Tensor, lengths: tuple[int, ...], max_len: int) -> torch.Tensor:
    """Right-pad packed (total, heads, dim) sequences into (batch, heads, max_len, dim)."""
    out = packed.new_zeros(len(lengths), max_len, *packed.shape[1:])
    for i, n in enumerate(lengths):
        out[i, :n] = packed[int(cu[i]):int(cu[i]) + n]
    return out.transpose(1, 2)


def unpad(padded: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
    """(batch, heads, max_len, dim) right-padded -> packed (total, heads, dim)."""
    return torch.cat([padded[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])


def reference(case: Case, inputs: tuple, layout: BlockLayout, scale: float,
              computes: str, grad: bool = False):
    """The reference output of the provider's problem, in the mode's canonical form."""
    if computes == "dense":
        layout = dense_layout(-(-case.seqlen // layout.block_size), layout.block_size, case.causal)
    if case.mode in TRAINING_MODES:
        return reference_attention(*inputs[:3], layout, sm_scale=scale, seq_dim=2, grad=grad)
    if case.mode == "decode":
        q, k, v, _, lengths = inputs
        return torch.stack([reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n],
                                                layout, sm_scale=scale)[0, 0]
                            for b, n in enumerate(lengths)])
    q, k, v, cu, *_, lengths = inputs
    return torch.cat([reference_attention(q[s:s + n][None], k[s:s + n][None], v[s:s + n][None],
                                          layout, sm_scale=scale)[0]
                      for s, n in zip(cu.tolist(), lengths)])
