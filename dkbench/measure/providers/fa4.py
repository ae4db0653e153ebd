"""FlashAttention-4 (the CuTe-DSL package ``flash-attn-4``, imported as ``flash_attn.cute``),
called directly: `fa4` on the dense (causal) problem in every mode (decode through its varlen
entry, a paged case with its `page_table`), `fa4_sparse` with the case's own pattern as FA4's
block-sparse tensors, forward and backward.

FA4 takes ``(batch, seq, heads, dim)``; the training inputs are ``(batch, heads, seq, dim)``, so
they go in as transposed views (no copy). Its causal mask aligns bottom-right, as ours does.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os

import torch

from kernels import BlockLayout, default_cache_path

from ...spec.sweep import FP8, Case, Sweep
from .base import MaskBlocks, Prepared, Provider, import_failure, refuse_fp8
from .forms import BlockSparseIndex, coarse_blocks, per_head_table, sparse_index

# FA4 checks its arguments with asserts and ValueErrors: a case it cannot run (a head size, a
# block shape, an architecture) raises one of these before any kernel runs.
FA4_REFUSALS = (AssertionError, ValueError, NotImplementedError, TypeError)


# FA4's own on-disk cache of compiled kernels, which it reads when imported. Off by default in FA4;
# dkbench turns it on unless these are set, so a kernel compiled by one run (3-21 s each on an
# H200, a variant per mode and mask) is loaded by the next.
CACHE_ENABLED_VAR = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
CACHE_DIR_VAR = "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"


def keep_compiles_on_disk() -> None:
    """Turn FA4's compile cache on, in ``fa4-cute/`` beside the best-config cache, where the user
    has not set it (``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=0`` keeps it off)."""
    os.environ.setdefault(CACHE_ENABLED_VAR, "1")
    os.environ.setdefault(CACHE_DIR_VAR, str(default_cache_path().parent / "fa4-cute"))


@functools.lru_cache(maxsize=1)
def fa4_unavailable() -> str | None:
    """Why FA4 cannot be imported here (its words), or None. Before the import: its compile
    cache on (`keep_compiles_on_disk`)."""
    keep_compiles_on_disk()
    return import_failure("flash_attn.cute", "flash-attn-4", "fa4")


def _unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "FlashAttention-4 needs a CUDA GPU"
    reason = fa4_unavailable()
    if reason:
        return reason
    major = torch.cuda.get_device_capability(device)[0]
    if major < 9:
        return f"FlashAttention-4 runs on Hopper (sm90) and newer; this GPU is sm{major}x"
    return None


def _fp8_refusal(device: torch.device) -> str:
    """Why an fp8 case gets no FA4 row here: FA4's fp8 forward (e4m3 q, k, v, bf16 out,
    descales per batch and kv head) is Blackwell's only."""
    major, minor = torch.cuda.get_device_capability(device)
    if major < 10:
        return (f"FlashAttention-4's fp8 forward runs on Blackwell (sm100) only; this GPU is "
                f"sm{major}{minor}; see the bf16 rows")
    return "FlashAttention-4's fp8 forward is not wired into dkbench yet; see the bf16 rows"


def _bshd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


class _Fa4Provider(Provider):
    """What FA4's providers share: its availability, its refusals, and its fp8 path's."""

    refusals = FA4_REFUSALS
    compiles = True

    def unavailable(self, device: torch.device) -> str | None:
        return _unavailable(device)

    @staticmethod
    def refuse_fp8(case: Case, device: torch.device) -> None:
        if case.dtype == FP8:
            refuse_fp8(case, _fp8_refusal(device))


class Fa4(_Fa4Provider):
    name = "fa4"
    computes = "dense"
    modes = ("fwd", "bwd", "fwd_bwd", "prefill_varlen", "decode")

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        self.refuse_fp8(case, device)
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

        causal = case.causal
        if case.mode == "prefill_varlen":
            max_len = case.seqlen

            def varlen(q, k, v, cu_seqlens, *_):
                out, _lse = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens,
                                                   cu_seqlens_k=cu_seqlens, max_seqlen_q=max_len,
                                                   max_seqlen_k=max_len, softmax_scale=scale,
                                                   causal=causal)
                return out

            return Prepared(varlen)
        if case.mode == "decode":
            # FA4 splits a long cache over the SMs (num_splits=0: its heuristic) on Blackwell;
            # on Hopper it refuses split-KV ("SplitKV not supported on SM 9.0").
            splits = 0 if torch.cuda.get_device_capability(device)[0] >= 10 else 1

            def decode(q, k_cache, v_cache, cache_seqlens, lengths, paged=None):
                # One query per sequence against its first cache_seqlens keys: the new token's
                # k/v are already in the cache and it sees all of them, so no causal mask.
                pages = {}
                if paged is not None:  # FA4's paged entry: its page_table is our block table
                    k_cache, v_cache, table = paged
                    pages = {"page_table": table}
                out, _lse = flash_attn_varlen_func(q[:, None], k_cache, v_cache,
                                                   seqused_k=cache_seqlens, softmax_scale=scale,
                                                   causal=False, num_splits=splits, **pages)
                return out[:, 0]

            label = "splits auto" if splits == 0 else "splits 1"
            if case.page_size:
                label += f", page_table page{case.page_size}"
            return Prepared(decode, label, "fa4")

        def attn(q, k, v):
            out, _lse = flash_attn_func(_bshd(q), _bshd(k), _bshd(v), softmax_scale=scale,
                                        causal=causal)
            return _bshd(out)

        return Prepared(attn)


class Fa4Sparse(_Fa4Provider):
    """FA4's block-sparse path with the case's pattern: full blocks run unmasked, partial blocks
    through a `mask_mod` that reads the pattern per token (causal diagonal included)."""

    name = "fa4_sparse"
    computes = "pattern"
    Options = MaskBlocks
    # The finest (q, kv) blocks FA4 takes on Hopper at head_dim 128: its forward's kv tile
    # shrinks to a 64-wide sparse block; its backward iterates 128-wide kv tiles and 64-row q.
    DEFAULT_FWD = (128, 64)
    DEFAULT_BWD = (64, 128)

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        self.refuse_fp8(case, device)
        from flash_attn.cute import flash_attn_func

        options: MaskBlocks = self.options(sweep)
        fwd_block = options.fwd_block or self.DEFAULT_FWD
        bwd_block = options.bwd_block or self.DEFAULT_BWD
        dims = (layout, case.heads, case.kv_heads, case.q_len, case.seqlen)
        forward = _fa4_tensors(sparse_index(coarse_blocks(*dims, *fwd_block, device)))
        label = f"fwd {fwd_block[0]}x{fwd_block[1]}"
        backward = None
        if case.mode != "fwd":
            backward = _fa4_tensors(sparse_index(coarse_blocks(*dims, *bwd_block, device),
                                                 kv_major=False))
            label += f", bwd {bwd_block[0]}x{bwd_block[1]}"
        pattern = per_head_table(layout, case.heads, case.kv_heads, device, torch.int32)
        mask_mod = pattern_mask_mod(layout.block_size, layout.causal)

        def attn(q, k, v):
            out, _lse = flash_attn_func(_bshd(q), _bshd(k), _bshd(v), softmax_scale=scale,
                                        mask_mod=mask_mod, aux_tensors=[pattern],
                                        block_sparse_tensors=forward,
                                        block_sparse_tensors_bwd=backward)
            return _bshd(out)

        return Prepared(attn, label, "default" if options == MaskBlocks() else "explicit")


def _fa4_tensors(index: BlockSparseIndex):
    """Our block index as FA4's ``BlockSparseTensorsTorch``, indices cut to the longest row."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    def compact(count: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        width = max(1, int(count.max()))
        return idx[..., :width].contiguous()

    return BlockSparseTensorsTorch(
        mask_block_cnt=index.partial_count.contiguous(),
        mask_block_idx=compact(index.partial_count, index.partial_index),
        full_block_cnt=index.full_count.contiguous(),
        full_block_idx=compact(index.full_count, index.full_index),
        block_size=(index.block_q, index.block_kv))


@functools.lru_cache(maxsize=None)
def pattern_mask_mod(block_size: int, causal: bool):
    """A CuTe-DSL mask_mod keeping (q, kv) when the pattern keeps their blocks (and kv <= q when
    causal); one function object per (block size, causality) so FA4 compiles it once."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    def kept(head, m_idx, n_idx, seqlen_info, aux_tensors):
        table = aux_tensors[0]
        offset = utils.scalar_to_ssa(seqlen_info.seqlen_k - seqlen_info.seqlen_q, cutlass.Int32)
        side = utils.scalar_to_ssa(block_size, cutlass.Int32)
        q_block = (m_idx + offset) // side
        k_block = n_idx // side
        bit = utils.scalar_to_ssa(table[head[0], q_block[0], k_block[0]], cutlass.Int32)
        return bit != utils.scalar_to_ssa(0, cutlass.Int32), m_idx + offset

    if causal:
        @cute.jit
        def mask_mod(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
            keep, q_abs = kept(head, m_idx, n_idx, seqlen_info, aux_tensors)
            return keep & (n_idx <= q_abs)
    else:
        @cute.jit
        def mask_mod(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
            keep, _ = kept(head, m_idx, n_idx, seqlen_info, aux_tensors)
            return keep

    # FA4 keys its compiles by this hash. Left to FA4, it would hash the repr of `kept` (an
    # address) and differ in every process, so its disk cache would never find this kernel.
    source = inspect.getsource(pattern_mask_mod)
    mask_mod.__cute_hash__ = hashlib.sha256(
        f"{source}|block_size={block_size}|causal={causal}".encode()).hexdigest()
    return mask_mod
