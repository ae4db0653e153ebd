"""What each benchmark mode feeds a provider, and the reference it is checked against.

Training modes (`fwd`, `bwd`, `fwd_bwd`) pass ``(q, k, v)`` as ``(batch, heads, seq, dim)``.
Inference modes give every sequence its own length: the spec's `lengths`, or drawn (seeded) from
``[seqlen * (1 - length_spread), seqlen]`` with the first sequence at ``seqlen``:

- `prefill_varlen`: `VarlenInputs`, the packed sequences plus a right-padded copy for dense
  baselines; outputs are compared packed, ``(total, heads, dim)``.
- `decode`: `DecodeInputs`, one new token per sequence and a KV cache holding each sequence's
  past (the new token included); outputs ``(batch, heads, dim)``. A paged case (`page_size`)
  also holds the cache as pages in a random order (`PagedCache`, its block table from
  `block_table`, one per case); the contiguous cache is then those pages gathered in order, so
  that dense baselines read the same keys without paying for the gather in their timed call.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
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


class PagedCache(NamedTuple):
    k_pages: torch.Tensor  # (num_pages, page_size, kv_heads, dim)
    v_pages: torch.Tensor
    block_table: torch.Tensor  # int32 (batch, max_pages)


class DecodeInputs(NamedTuple):
    q: torch.Tensor  # (batch, heads, dim)
    k_cache: torch.Tensor  # (batch, max_len, kv_heads, dim); paged: the pages gathered
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor  # int32 (batch,)
    lengths: tuple[int, ...]
    paged: PagedCache | None = None  # a paged case's cache as its pages


def sequence_lengths(case: Case) -> tuple[int, ...]:
    """Per-sequence lengths of an inference case: the spec's `lengths`, or drawn reproducibly (a
    paged case draws those of its contiguous twin, so that the two compare row for row)."""
    if case.lengths:
        return case.lengths
    rng = random.Random(f"{case.seed}|{dataclasses.replace(case, page_size=0).case_id}")
    low = max(1, round(case.seqlen * (1.0 - case.length_spread)))
    return (case.seqlen, *(rng.randint(low, case.seqlen) for _ in range(case.batch - 1)))


@functools.lru_cache(maxsize=16)
def block_table(case: Case) -> torch.Tensor:
    """A paged decode case's block table, int32 ``(batch, ceil(seqlen / page_size))`` on the CPU:
    sequence ``b``'s first ``ceil(len_b / page_size)`` entries are its pages, taken from a pool of
    exactly that many in a random order (never the identity when there are two or more; seeded by
    the case, so every call, check and provider of the case sees one table); later entries 0."""
    size, lengths = case.page_size, sequence_lengths(case)
    used = [math.ceil(n / size) for n in lengths]
    rng = random.Random(f"{case.seed}|{case.case_id}|pages")
    order = torch.randperm(sum(used), generator=torch.Generator().manual_seed(rng.getrandbits(63)))
    if len(order) > 1 and torch.equal(order, torch.arange(len(order))):
        order = order.roll(1)  # a kernel that ignores the table must read the wrong pages
    table = torch.zeros(case.batch, math.ceil(case.seqlen / size), dtype=torch.int32)
    for b, (start, count) in enumerate(zip(itertools.accumulate([0, *used]), used)):
        table[b, :count] = order[start:start + count]
    return table


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
        if not case.page_size:
            return DecodeInputs(randn(case.batch, h, d), randn(case.batch, case.seqlen, hkv, d),
                                randn(case.batch, case.seqlen, hkv, d), lens, lengths)
        q, table = randn(case.batch, h, d), block_table(case)
        pool = (int(table.max()) + 1, case.page_size, hkv, d)  # every page is some sequence's
        table = table.to(device, copy=True)  # the cached table stays the case's own
        paged = PagedCache(randn(*pool), randn(*pool), table)
        return DecodeInputs(q, _gathered(paged.k_pages, table, case.seqlen),
                            _gathered(paged.v_pages, table, case.seqlen), lens, lengths, paged)
    total = sum(lengths)
    q, k, v = randn(total, h, d), randn(total, hkv, d), randn(total, hkv, d)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device,
                      dtype=torch.int32)
    return VarlenInputs(q, k, v, cu, *(_pad(t, cu, lengths, case.seqlen) for t in (q, k, v)),
                        lengths)


def _gathered(pages: torch.Tensor, table: torch.Tensor, max_len: int) -> torch.Tensor:
    """Each sequence's pages in order, ``(batch, max_len, kv_heads, dim)``: the contiguous cache
    that holds what the block table points at (past a sequence's pages, page 0's rows)."""
    return pages[table.long()].flatten(1, 2)[:, :max_len].contiguous()


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
        q, k, v = inputs.q, inputs.k_cache, inputs.v_cache  # paged: the pages gathered
        return torch.stack([reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n],
                                                layout, sm_scale=scale)[0, 0]
                            for b, n in enumerate(inputs.lengths)])
    q, k, v, cu, *_, lengths = inputs
    return torch.cat([reference_attention(q[s:s + n][None], k[s:s + n][None], v[s:s + n][None],
                                          layout, sm_scale=scale)[0]
                      for s, n in zip(cu.tolist(), lengths)])
