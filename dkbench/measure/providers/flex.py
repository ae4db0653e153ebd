"""FlexAttention (torch.compile'd) with a block mask built from the case's own pattern, on its
Triton backend (`flex`) and on its FLASH backend, FlashAttention-4 (`flex_flash`).

The block mask comes from the pattern compiler (`forms.coarse_blocks`) through
`BlockMask.from_kv_blocks`, never from a token-level mask, so building it costs O(blocks) memory
at any sequence length. Its (q, kv) block shape is the provider's default or the spec's
`provider_options`; a block is "full" when every token pair in it is kept, and "partial"
(checked per token by `mask_mod`) otherwise.

`mask_mod` reads the pattern from a per-head table. Every case of a sweep gets a table of one
shape, the sweep's largest (`shared_table_shape`): the table's sizes are written into the code
Inductor generates for `mask_mod`, and on the FLASH backend a new code means a new FlashAttention-4
compile (about 6 s for a forward, 13 s for a forward and backward on an H200). With one shape
the cases of a sweep differ only in their tensors' sizes, which FA4 takes at run time.
"""

from __future__ import annotations

import functools

import torch

from kernels import BlockLayout

from ...spec.sweep import Case, Sweep, expand
from .base import MaskBlocks, Prepared, Provider, refuse_fp8
from .fa4 import fa4_unavailable
from .forms import TABLE_SLACK_TOKENS, block_index, coarse_blocks, per_head_table

FLEX_BLOCK = 128
# Compiled graphs dynamo keeps for the one compiled flex_attention: every case (its shapes and
# mask) and its check's cut-down copy add one. Past the limit dynamo would fall back to eager
# flex, which materialises the scores.
RECOMPILE_LIMIT = 256
# The largest mask table a sweep's cases share; past it each case's table has its own size (and
# on the FLASH backend its own compile). The phi-3 sweep's is 34 MB: 32 heads, 1,028 blocks a side.
SHARED_TABLE_BYTES = 256 * 2**20


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """flex_attention compiled once for the run (static shapes, as users compile it): a case
    whose shapes were compiled before (the checks' cut-down copies share theirs) reuses them,
    instead of starting dynamo afresh for every case."""
    from torch.nn.attention.flex_attention import flex_attention
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False)


def shared_table_shape(sweep: Sweep, block_size: int) -> tuple[int, int, int]:
    """(heads, q blocks, k blocks) of a mask table that holds the pattern of any case of
    ``sweep`` at ``block_size`` (slack included); (0, 0, 0), each case its own size, when there
    is none or it would take more than SHARED_TABLE_BYTES."""
    cases = [c for c in expand(sweep) if c.block_size == block_size]
    if not cases:
        return 0, 0, 0
    heads = max(c.heads for c in cases)
    side = max(-(-c.seqlen // block_size) for c in cases) + -(-TABLE_SLACK_TOKENS // block_size)
    if heads * side * side > SHARED_TABLE_BYTES:  # a bool table: a byte an entry
        return 0, 0, 0
    return heads, side, side


def build_block_mask(layout: BlockLayout, heads: int, kv_heads: int, q_len: int, seq_k: int,
                     device: torch.device, block: tuple[int, int] = (FLEX_BLOCK, FLEX_BLOCK),
                     table_shape: tuple[int, int, int] = (0, 0, 0)):
    """A FlexAttention BlockMask for this layout at ``block`` = (q, kv) tokens; queries are the
    last q_len positions. Full blocks skip ``mask_mod``; partial ones apply it per token, reading
    a pattern table padded to at least ``table_shape`` (`shared_table_shape`)."""
    from torch.nn.attention.flex_attention import BlockMask

    block_q, block_kv = block
    offset = seq_k - q_len
    blocks = coarse_blocks(layout, heads, kv_heads, q_len, seq_k, block_q, block_kv, device)
    kv_num, kv_idx = block_index(blocks.partial)
    full_num, full_idx = block_index(blocks.full)
    # The pattern per query head, flattened: mask_mod then indexes one buffer with arithmetic on
    # its own int32 indices. FLASH's CuTe lowering rejected a gather through an int64 head map.
    table = per_head_table(layout, heads, kv_heads, device, at_least=table_shape)
    q_blocks, k_blocks = table.shape[1], table.shape[2]
    table = table.reshape(-1)
    bs, causal = layout.block_size, layout.causal

    def mask_mod(b, h, q_idx, kv_idx):
        q_abs = q_idx + offset if offset else q_idx
        keep = table[(h * q_blocks + q_abs // bs) * k_blocks + kv_idx // bs]
        return keep & (kv_idx <= q_abs) if causal else keep

    return BlockMask.from_kv_blocks(kv_num[None], kv_idx[None], full_num[None], full_idx[None],
                                    BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(q_len, seq_k))


class Flex(Provider):
    name = "flex"
    computes = "pattern"
    compiles = True
    Options = MaskBlocks
    # kernel_options for flex_attention; the Triton backend when None.
    kernel_options: dict | None = None
    fp8_refusal = ("FlexAttention in fp8 (e4m3 q, k, v, their descales in a score_mod) is not "
                   "wired into dkbench; see the bf16 rows")

    def unavailable(self, device: torch.device) -> str | None:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as exc:
            return f"FlexAttention is not in this torch: {exc}"
        if device.type != "cuda":
            return "FlexAttention is timed on CUDA GPUs only (its CPU path compiles for minutes)"
        return None

    def mask_block(self, case: Case, layout: BlockLayout, options: MaskBlocks) -> tuple[int, int]:
        """The (q, kv) block of the case's mask: one mask serves forward and backward."""
        if case.mode == "fwd":
            return options.fwd_block or self.default_block(case, layout)
        return options.bwd_block or self.default_block(case, layout)

    def default_block(self, case: Case, layout: BlockLayout) -> tuple[int, int]:
        # The Triton backend fails to compile blocks under 128 on Hopper.
        side = max(FLEX_BLOCK, layout.block_size)
        return side, side

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        refuse_fp8(case, self.fp8_refusal)
        block = self.mask_block(case, layout, self.options(sweep))
        block_mask = build_block_mask(layout, case.heads, case.kv_heads, case.q_len, case.seqlen,
                                      device, block, shared_table_shape(sweep, layout.block_size))
        flex = _compiled_flex()
        gqa = case.heads != case.kv_heads
        extra = {"kernel_options": self.kernel_options} if self.kernel_options else {}

        def attn(q, k, v):
            return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, **extra)

        return Prepared(attn, f"block{block[0]}x{block[1]}", "")


class FlexFlash(Flex):
    """FlexAttention on its FLASH backend: the same BlockMask, run by FlashAttention-4's kernels
    (flash-attn-4 installed)."""

    name = "flex_flash"
    kernel_options = {"BACKEND": "FLASH"}
    fp8_refusal = ("FlexAttention's FLASH backend is FlashAttention-4, whose fp8 forward runs on "
                   "Blackwell (sm100) only; not wired into dkbench; see the bf16 rows")
    # FA4's refusals of a mask shape or head size reach us as these.
    refusals = (ValueError, AssertionError, NotImplementedError)

    def unavailable(self, device: torch.device) -> str | None:
        return super().unavailable(device) or fa4_unavailable()

    def default_block(self, case: Case, layout: BlockLayout) -> tuple[int, int]:
        # On Hopper FA4's forward takes kv blocks of 64; its backward only 128-wide kv blocks.
        return (128, 64) if case.mode == "fwd" else (128, 128)
