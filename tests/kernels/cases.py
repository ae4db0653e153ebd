"""Shared problem builders for kernel tests: fresh random inputs, every layout family."""

from __future__ import annotations

import torch

from kernels import BlockLayout, local_stride_layout, random_layout
from kernels.layout import dense_layout

# phi-3-small's pattern arguments (local_stride_layout), for the tests at its real sizes.
PHI3 = {"num_heads": 32, "block_size": 64, "local_blocks": 16, "vert_stride": 8,
        "head_sliding_offset": 1}


def make_layout(family: str, heads: int, kv_heads: int, seqlen: int, block: int,
                causal: bool = True) -> BlockLayout:
    nb = -(-seqlen // block)
    if family == "homo":
        return local_stride_layout(heads, seqlen, block, 2, 3, homo_head=True, causal=causal)
    if family == "hetero":
        return local_stride_layout(heads, seqlen, block, 2, 3, head_sliding_offset=1, causal=causal)
    if family == "dense_heads":
        return local_stride_layout(heads, seqlen, block, 1, 4, num_kv_heads=kv_heads,
                                   num_dense_heads=1, causal=causal)
    if family == "random":
        return random_layout(heads, nb, block, 0.35, seed=int(torch.randint(0, 10**6, ())),
                             causal=causal)
    if family == "dense":
        return dense_layout(nb, block, causal=causal)
    raise ValueError(family)


def make_qkv(batch: int, seq_q: int, seq_k: int, heads: int, kv_heads: int, dim: int,
             dtype: torch.dtype, device: str, seq_dim: int = 1, contiguous: bool = True,
             requires_grad: bool = False):
    """Random q, k, v (never zeros); non-contiguous ones are strided views into larger buffers."""
    def one(seq: int, h: int) -> torch.Tensor:
        shape = (batch, seq, h, dim) if seq_dim == 1 else (batch, h, seq, dim)
        if contiguous:
            t = torch.randn(shape, device=device, dtype=dtype)
        else:
            # Last dim strided by 2 and a padded head axis: no dimension is packed.
            big = torch.randn(*shape[:-1], 2 * dim + 3, device=device, dtype=dtype)
            t = big[..., : 2 * dim : 2]
            assert not t.is_contiguous()
        return t.requires_grad_(requires_grad)

    return one(seq_q, heads), one(seq_k, kv_heads), one(seq_k, kv_heads)
