"""Block-sparse attention in Triton: layouts, kernels, the autograd/nn.Module API, a reference."""

from .attention import LocalStrideSparseAttention, SparseAttention, sparse_attention
from .configs import LaunchConfig
from .inference import sparse_attention_decode, sparse_attention_padded, sparse_attention_varlen
from .layout import (
    BlockLayout,
    KVCacheUnfriendlyWarning,
    csc,
    csr,
    dense_layout,
    local_stride_layout,
    random_layout,
    token_mask,
)
from .reference import reference_attention
from .registry import KERNELS, KernelRecord

__version__ = "0.1.0"

__all__ = [
    "KERNELS",
    "BlockLayout",
    "KVCacheUnfriendlyWarning",
    "KernelRecord",
    "LaunchConfig",
    "LocalStrideSparseAttention",
    "SparseAttention",
    "csc",
    "csr",
    "dense_layout",
    "local_stride_layout",
    "random_layout",
    "reference_attention",
    "sparse_attention",
    "sparse_attention_decode",
    "sparse_attention_padded",
    "sparse_attention_varlen",
    "token_mask",
]
