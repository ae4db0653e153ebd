"""FlashInfer (the ``flashinfer-python`` package), called directly, forward only: `flashinfer` with
the case's own block pattern, `flashinfer_decode` on the dense decode problem over a paged cache
(the contiguous cache viewed as pages, or a paged case's own pages and block table).

`flashinfer` uses `VariableBlockSparseAttentionWrapper`, not `BlockSparseAttentionWrapper`:
the latter plans one BSR matrix for every head of one sequence (``indptr`` ``(MB + 1,)``) and
needs ``N % C == 0``, so a pattern per GQA group, a batch or a ragged key length would take a
call per kv head and sequence, or copies. The variable wrapper plans a block map per kv head
(``block_mask_map`` ``(num_kv_heads, MB, NB)``) with per-block sizes, takes ``(heads, seq, dim)``
inputs, and treats kv heads as independent problems, so the batch folds into them: one plan and
one call per case, ragged lengths as a short last block.

It has no per-token mask, only ``causal``, applied to each (kv head, q block) row as FlashInfer's
bottom-right causal mask over the row's gathered keys (key ``t`` of ``kv_len`` gathered ones is
masked for row query ``r`` of ``qo_len`` when ``t + qo_len > kv_len + r``). That is the true
causal mask exactly when the last gathered keys are the row's own query positions: blocks that lie
inside one pattern block (the pinned block divides the pattern's), q blocks aligned to absolute
multiples of the q block, and, when causal, kv blocks that divide the q block, so each q block
ends on a kv block boundary; a causal layout keeps every diagonal block (`BlockLayout` checks it).
Other block shapes are `Unsupported`.

Setup (block maps, workspace, ``plan``) happens in `prepare`, outside timing; ``run`` rearranges
q and the output for GQA itself, a cost every user of the wrapper pays, so it stays timed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from kernels import BlockLayout

from ...spec.sweep import Case, Sweep
from ..modes import block_table, sequence_lengths
from .base import (
    ForwardMaskBlocks,
    Prepared,
    Provider,
    Unsupported,
    import_failure,
    refuse_fp8,
)
from .forms import coarse_blocks, per_kv_head

# FlashInfer's plan() checks arguments with ValueError and NotImplementedError; its RuntimeErrors
# come from kernels and JIT builds as well, so they stay errors.
FLASHINFER_REFUSALS = (ValueError, NotImplementedError)
# FlashInfer's recommended float workspace for split-k partial results.
WORKSPACE_BYTES = 128 * 1024 * 1024
DECODE_PAGE = 16


@functools.lru_cache(maxsize=1)
def flashinfer_unavailable() -> str | None:
    """Why FlashInfer cannot be imported here (its words), or None."""
    return import_failure("flashinfer", "flashinfer", "flashinfer")


def _unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "FlashInfer needs a CUDA GPU"
    return flashinfer_unavailable()


def _workspace(device: torch.device) -> torch.Tensor:
    # Zeroed: the decode wrapper requires it on first use.
    return torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)


# -- block-sparse prefill: the pattern as per-kv-head variable blocks --

@dataclass(frozen=True)
class VariableBlocks:
    """The pattern as FlashInfer's variable-block plan for one sequence: ``mask`` bool
    ``(kv_heads, q_blocks, kv_blocks)``, token counts ``row_sizes`` ``(q_blocks,)`` and
    ``col_sizes`` ``(kv_blocks,)`` (int32, summing to q_len and seq_k)."""

    mask: torch.Tensor
    row_sizes: torch.Tensor
    col_sizes: torch.Tensor
    block_q: int
    block_kv: int


def check_block_shape(block_size: int, block_q: int, block_kv: int, causal: bool) -> None:
    """Unsupported unless FlashInfer's whole-block map with its causal flag is exact here."""
    if block_size % block_q or block_size % block_kv:
        raise Unsupported(
            f"FlashInfer's variable block-sparse wrapper has no per-token mask: a ({block_q}, "
            f"{block_kv}) block must divide the pattern's {block_size}-token block so each one "
            "is kept or dropped whole")
    if causal and block_q % block_kv:
        raise Unsupported(
            f"FlashInfer applies the causal mask at the end of each q block's gathered keys: the "
            f"kv block ({block_kv}) must divide the q block ({block_q})")


def variable_blocks(layout: BlockLayout, heads: int, kv_heads: int, q_len: int, seq_k: int,
                    block_q: int, block_kv: int,
                    device: torch.device | str | None = None) -> VariableBlocks:
    """The layout as one block map per kv head; queries are the last ``q_len`` of ``seq_k``.

    q blocks sit at absolute multiples of ``block_q`` (the first one cut at the first query, the
    last at ``seq_k``) so that each lies inside one pattern block whatever the queries' offset;
    kv blocks at multiples of ``block_kv``. Unsupported when the shape is not exact
    (`check_block_shape`) or when the query heads of a GQA group keep different blocks.
    """
    check_block_shape(layout.block_size, block_q, block_kv, layout.causal)
    offset = seq_k - q_len
    start = offset // block_q * block_q
    # Extending the first q block back to `start` keeps the same kv blocks: it lies in one
    # pattern row, and under causality its last query is unchanged.
    blocks = coarse_blocks(layout, heads, kv_heads, seq_k - start, seq_k, block_q, block_kv,
                           device)
    kept = blocks.kept
    try:
        per_group = per_kv_head(kept, kv_heads)
    except ValueError:
        raise Unsupported("FlashInfer's block-sparse wrappers take one block map per kv head: the "
                          "query heads of a GQA group keep different blocks here (it needs one "
                          "pattern per GQA group)") from None
    edges_q = torch.arange(kept.shape[1] + 1, dtype=torch.int64) * block_q + start
    edges_q = edges_q.clamp(min=offset, max=seq_k)
    edges_k = (torch.arange(kept.shape[2] + 1, dtype=torch.int64) * block_kv).clamp(max=seq_k)
    return VariableBlocks(per_group, edges_q.diff().to(torch.int32),
                          edges_k.diff().to(torch.int32), block_q, block_kv)


def batched_plan_args(blocks: VariableBlocks, batch: int,
                      device: torch.device | str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block_mask_map``, ``block_row_sz``, ``block_col_sz`` for ``batch`` sequences folded into
    the kv heads: index ``b * kv_heads + g`` is sequence b's kv head g, which is how
    ``(batch, heads, seq, dim)`` reshapes to ``(batch * heads, seq, dim)``."""
    device = device if device is not None else blocks.mask.device
    kv_heads = blocks.mask.shape[0]
    mask = blocks.mask.repeat(batch, 1, 1).to(device)
    rows = blocks.row_sizes.repeat(batch * kv_heads, 1).to(device)
    cols = blocks.col_sizes.repeat(batch * kv_heads, 1).to(device)
    return mask, rows, cols


class FlashInferSparse(Provider):
    """The case's pattern through FlashInfer's `VariableBlockSparseAttentionWrapper`."""

    name = "flashinfer"
    computes = "pattern"
    supports_grad = False
    modes = ("fwd",)
    refusals = FLASHINFER_REFUSALS
    compiles = True
    Options = ForwardMaskBlocks

    def unavailable(self, device: torch.device) -> str | None:
        return _unavailable(device)

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        refuse_fp8(case, "FlashInfer's variable block-sparse wrapper is measured in bf16 only: "
                         "its fp8 path is not wired into dkbench; see the bf16 rows")
        options: ForwardMaskBlocks = self.options(sweep)
        block = options.fwd_block or (layout.block_size, layout.block_size)
        # The block maps refuse what FlashInfer cannot express, before it is even imported.
        blocks = variable_blocks(layout, case.heads, case.kv_heads, case.q_len, case.seqlen,
                                 *block, device)
        from flashinfer import VariableBlockSparseAttentionWrapper

        batch, heads, kv_heads, dim = case.batch, case.heads, case.kv_heads, case.head_dim
        dtype = getattr(torch, case.dtype)
        wrapper = VariableBlockSparseAttentionWrapper(_workspace(device))
        wrapper.plan(*batched_plan_args(blocks, batch, device), batch * heads, batch * kv_heads,
                     dim, causal=layout.causal, sm_scale=scale, q_data_type=dtype,
                     kv_data_type=dtype)
        q_len, seq_k = case.q_len, case.seqlen

        def attn(q, k, v):
            # (batch, heads, seq, dim) is contiguous: these reshapes are views.
            out = wrapper.run(q.reshape(batch * heads, q_len, dim),
                              k.reshape(batch * kv_heads, seq_k, dim),
                              v.reshape(batch * kv_heads, seq_k, dim))
            return out.view(batch, heads, q_len, dim)

        return Prepared(attn, f"block{block[0]}x{block[1]}",
                        "default" if options == ForwardMaskBlocks() else "explicit")


# -- decode: the padded cache as pages --

class DecodePages(BaseModel):
    """Options of `flashinfer_decode`: the page size a contiguous cache is viewed in (it must
    divide the cache length; None takes the largest divisor of it up to 16; a paged case runs on
    its own pages, so another size pinned there is unsupported) and FlashInfer's
    ``use_tensor_cores`` (its prefill kernels for decode, faster for large GQA groups)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Strict, as the rest of a spec: `"yes"` is not true, nor `16.0` a page size.
    page_size: StrictInt | None = Field(default=None, ge=1, le=1024)
    use_tensor_cores: StrictBool = False


def decode_page_size(max_len: int, pinned: int | None = None) -> int:
    """The page size for a ``max_len`` cache: pinned (it must divide max_len), else gcd with 16."""
    if pinned is None:
        return math.gcd(max_len, DECODE_PAGE)
    if max_len % pinned:
        raise Unsupported(f"page_size {pinned} does not divide the cache length {max_len}, so the "
                          "cache cannot be viewed as pages")
    return pinned


def page_table(lengths: torch.Tensor, max_len: int, page_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's page table for a right-padded cache ``(batch, max_len, ...)`` viewed as
    ``(batch * max_len / page_size)`` pages, sequence b owning pages ``b * max_len / page_size``
    on, in order: `paged_kv_plan` of that block table."""
    per_seq = max_len // page_size
    owned = torch.arange(lengths.numel() * per_seq, device=lengths.device).view(-1, per_seq)
    return paged_kv_plan(owned, lengths, page_size)


def paged_kv_plan(block_table: torch.Tensor, lengths: torch.Tensor, page_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block table ``(batch, max_pages)`` as FlashInfer's paged-KV plan: ``kv_indptr``
    ``(batch + 1,)``, ``kv_indices`` (each sequence's first ``ceil(len / page_size)`` table
    entries, in order) and ``last_page_len`` (entries in the last page, 1..page_size), int32."""
    lengths = lengths.to(torch.int64)
    pages = (lengths + page_size - 1) // page_size
    indptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    indptr[1:] = pages.cumsum(0)
    live = torch.arange(block_table.shape[1], device=lengths.device)[None, :] < pages[:, None]
    indices = block_table.to(lengths.device)[live]  # row-major: sequence by sequence, in order
    last = lengths - (pages - 1) * page_size
    return indptr.to(torch.int32), indices.to(torch.int32), last.to(torch.int32)


class FlashInferDecode(Provider):
    """One new token per sequence against its cache through FlashInfer's
    `BatchDecodeWithPagedKVCacheWrapper` (NHD pages), the dense decode problem."""

    name = "flashinfer_decode"
    computes = "dense"
    supports_grad = False
    modes = ("decode",)
    refusals = FLASHINFER_REFUSALS
    compiles = True
    Options = DecodePages

    def unavailable(self, device: torch.device) -> str | None:
        return _unavailable(device)

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        refuse_fp8(case, "fp8 cases run the training modes only; FlashInfer's fp8 KV-cache "
                         "decode is not wired into dkbench")
        options: DecodePages = self.options(sweep)
        lengths = torch.tensor(sequence_lengths(case), dtype=torch.int32)
        if case.page_size:  # a paged case: the case's own pages, with its block table
            if options.page_size not in (None, case.page_size):
                raise Unsupported(f"provider_options.flashinfer_decode.page_size "
                                  f"{options.page_size} is not this case's page_size "
                                  f"{case.page_size}: a paged case runs on its own pages")
            page = case.page_size
            plan = paged_kv_plan(block_table(case), lengths, page)
        else:
            page = decode_page_size(case.seqlen, options.page_size)
            plan = page_table(lengths, case.seqlen, page)
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper

        indptr, indices, last = (t.to(device) for t in plan)
        dtype = getattr(torch, case.dtype)
        wrapper = BatchDecodeWithPagedKVCacheWrapper(_workspace(device), "NHD",
                                                     use_tensor_cores=options.use_tensor_cores)
        wrapper.plan(indptr, indices, last, case.heads, case.kv_heads, case.head_dim, page,
                     q_data_type=dtype, kv_data_type=dtype, sm_scale=scale)
        pages = case.batch * case.seqlen // page
        shape = (pages, page, case.kv_heads, case.head_dim)

        def decode(q, k_cache, v_cache, cache_seqlens, lengths, paged=None):
            if paged is not None:
                return wrapper.run(q, (paged.k_pages, paged.v_pages))
            # The contiguous (batch, max_len, kv_heads, dim) cache is already NHD pages: a view.
            return wrapper.run(q, (k_cache.view(shape), v_cache.view(shape)))

        label = (f"page {page}" + (" (the case's pages)" if case.page_size else "")
                 + (", tensor cores" if options.use_tensor_cores else ""))
        return Prepared(decode, label, "default" if options == DecodePages() else "explicit")
