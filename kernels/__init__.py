"""Block-sparse attention in Triton: layouts, kernels, the autograd/nn.Module API, a reference,
the kernel registry and the lookup of tuned launch configs."""

from .attention import (
                        CONFIG_ARGUMENTS,
                        LocalStrideSparseAttention,
                        SparseAttention,
                        sparse_attention,
)
from .common import TilePlan, tile_plan
from .config_cache import (
                        CONFIG_FIELDS,
                        ENV_VAR,
                        CacheKey,
                        ConfigCache,
                        ConfigCacheWarning,
                        default_cache_path,
                        load_shipped,
                        read_entries,
)
from .configs import (
                        MAX_STAGES,
                        WARP_COUNTS,
                        LaunchConfig,
                        check_config,
                        config_problems,
                        default_config,
                        gluon_unavailable,
                        tile_ok,
)
from .decode import PAGE_SIZES, DecodeWorkspace, auto_splits
from .dispatch import Choice, choose_impl
from .fp8 import (
                        FP8_DTYPE,
                        GLUON_FP8_DEFAULT,
                        fp8_config_problems,
                        fp8_default_config,
                        fp8_gluon_unavailable,
                        fp8_triton_default,
                        resolve_fp8_config,
)
from .fp8_bwd import Fp8BwdConfigs, fp8_bwd_config_problems, fp8_bwd_default_configs
from .fp8_train import sparse_attention_fp8_bwd, sparse_attention_fp8_trainable
from .inference import (
                        decode_workspace,
                        group_plan,
                        resolve_varlen_config,
                        sparse_attention_decode,
                        sparse_attention_padded,
                        sparse_attention_varlen,
                        varlen_plan,
                        varlen_sequences,
)
from .keys import density_bucket, seqlen_bucket, source_hash
from .layout import (
                        MAX_NUM_BLOCKS,
                        BlockLayout,
                        KVCacheUnfriendlyWarning,
                        causal_pairs,
                        csc,
                        csr,
                        dense_layout,
                        kept_pairs,
                        local_stride_layout,
                        random_layout,
                        token_mask,
)
from .partitions import combine_attn_partitions, sparse_attention_partition
from .quant import Fp8Inputs, dequantize_fp8, quantize_fp8, sparse_attention_fp8
from .reference import layout_head_index, reference_attention
from .registry import AXES, IMPLS, KERNELS, TUNABLE, KernelRecord
from .select import block_density, cache_key, clear_memo, kernel_hash, resolve_config
from .varlen import VarlenSequences

__version__ = "0.1.0"

__all__ = [
    "AXES",
    "CONFIG_ARGUMENTS",
    "CONFIG_FIELDS",
    "ENV_VAR",
    "FP8_DTYPE",
    "Fp8BwdConfigs",
    "GLUON_FP8_DEFAULT",
    "IMPLS",
    "KERNELS",
    "MAX_NUM_BLOCKS",
    "MAX_STAGES",
    "PAGE_SIZES",
    "TUNABLE",
    "WARP_COUNTS",
    "BlockLayout",
    "CacheKey",
    "Choice",
    "ConfigCache",
    "ConfigCacheWarning",
    "DecodeWorkspace",
    "Fp8Inputs",
    "KVCacheUnfriendlyWarning",
    "KernelRecord",
    "LaunchConfig",
    "LocalStrideSparseAttention",
    "SparseAttention",
    "TilePlan",
    "VarlenSequences",
    "auto_splits",
    "block_density",
    "cache_key",
    "causal_pairs",
    "check_config",
    "choose_impl",
    "clear_memo",
    "combine_attn_partitions",
    "config_problems",
    "csc",
    "csr",
    "decode_workspace",
    "default_cache_path",
    "default_config",
    "dense_layout",
    "density_bucket",
    "dequantize_fp8",
    "fp8_bwd_config_problems",
    "fp8_bwd_default_configs",
    "fp8_config_problems",
    "fp8_default_config",
    "fp8_gluon_unavailable",
    "fp8_triton_default",
    "gluon_unavailable",
    "group_plan",
    "kept_pairs",
    "kernel_hash",
    "layout_head_index",
    "load_shipped",
    "local_stride_layout",
    "quantize_fp8",
    "random_layout",
    "read_entries",
    "reference_attention",
    "resolve_config",
    "resolve_fp8_config",
    "resolve_varlen_config",
    "seqlen_bucket",
    "source_hash",
    "sparse_attention",
    "sparse_attention_decode",
    "sparse_attention_fp8",
    "sparse_attention_fp8_bwd",
    "sparse_attention_fp8_trainable",
    "sparse_attention_padded",
    "sparse_attention_partition",
    "sparse_attention_varlen",
    "tile_ok",
    "tile_plan",
    "token_mask",
    "varlen_plan",
    "varlen_sequences",
]
