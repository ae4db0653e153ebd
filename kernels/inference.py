"""Inference API: variable-length and left-padded prefill, chunked prefill, KV-cache decoding.

These forms are forward-only (no gradients). Every sequence's block pattern starts at its own
first token. Checks happen here, once, before any launch. Each form has its own kernel record and
config-cache entries: "varlen" (the varlen and padded calls) and "decode".
"""

from __future__ import annotations

import math

import torch

from . import select
from .checks import check_heads, check_scale, check_tensors
from .configs import LaunchConfig, check_config
from .decode import MAX_SPLITS, sparse_attention_decode_fwd
from .layout import BlockLayout
from .varlen import new_varlen_output, sequences, sparse_attention_fwd_varlen


def _check_common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                  ranks: int, sm_scale: float | None, names: tuple[str, str, str] = ("q", "k", "v"),
                  shape_hint: str = "") -> None:
    check_tensors(names, (q, k, v), ranks, shape_hint)
    for name, t in zip(names, (q, k, v)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad: the varlen, padded and decode forms are "
                             "inference-only; use sparse_attention for training")
    if k.shape != v.shape:
        raise ValueError(f"{names[1]} and {names[2]} must have one shape, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k must have one head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    check_heads(q.shape[-2], k.shape[-2], q.shape[-1], layout)
    check_scale(sm_scale)


def _lengths(name: str, t: torch.Tensor) -> list[int]:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a 1-D integer tensor")
    return [int(x) for x in t.tolist()]


def resolve_varlen_config(probe: torch.Tensor, layout: BlockLayout,
                          seq_k: int) -> tuple[LaunchConfig, str]:
    """The launch config a varlen or padded call runs when none is given, and where it came from:
    :func:`kernels.select.resolve_config` for the "varlen" kernel (its own cache entries, its
    own Triton default). ``probe`` carries the device, dtype and head_dim."""
    return select.resolve_config("varlen", probe, layout, seq_k)


def _config(q: torch.Tensor, layout: BlockLayout, seq_k: int, config: LaunchConfig | None,
            dim: int) -> LaunchConfig:
    if config is None:
        config = resolve_varlen_config(q.new_empty(1, 1, 1, dim), layout, seq_k)[0]
    elif config.impl != "triton":
        raise ValueError(f"config {config.short()}: varlen and padded calls run the Triton "
                         "kernel; give a config with impl='triton'")
    check_config(config, layout.block_size, dim, "varlen")
    return config


def _check_lengths(layout: BlockLayout, q_lens: list[int], k_lens: list[int]) -> None:
    for i, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        if ql < 1 or kl < 1:
            raise ValueError(f"sequence {i} has length {ql} (queries) / {kl} (keys); zero-length "
                             "sequences are not allowed: leave them out of the batch")
        if ql > kl:
            raise ValueError(f"sequence {i}: {ql} queries but {kl} keys; queries are the last "
                             "positions of their sequence (chunked prefill), so q_len <= k_len")
        layout.check_seqlen(kl, ql)


def sparse_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                            layout: BlockLayout, sm_scale: float | None = None,
                            config: LaunchConfig | None = None) -> torch.Tensor:
    """Packed variable-length sequences, as FlashAttention's varlen API takes them.

    q: ``(total_q, heads, dim)``; k, v: ``(total_k, kv_heads, dim)``; ``cu_seqlens_q/k``: int
    ``(num_seqs + 1,)`` cumulative lengths starting at 0. Sequence ``i``'s queries are the last
    ``q_len_i`` of its ``k_len_i`` positions, so chunked prefill of several sequences is one call.
    Returns ``(total_q, heads, dim)``.
    """
    _check_common(q, k, v, layout, 3, sm_scale, shape_hint="(total, heads, dim)")
    cq, ck = _lengths("cu_seqlens_q", cu_seqlens_q), _lengths("cu_seqlens_k", cu_seqlens_k)
    if len(cq) != len(ck) or len(cq) < 2:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have num_seqs + 1 >= 2 entries, "
                         f"got {len(cq)} and {len(ck)}")
    if cq[0] != 0 or ck[0] != 0 or cq[-1] != q.shape[0] or ck[-1] != k.shape[0]:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed lengths "
                         f"(q: {q.shape[0]}, k: {k.shape[0]}), got q: {cq[0]}..{cq[-1]}, "
                         f"k: {ck[0]}..{ck[-1]}")
    q_lens = [b - a for a, b in zip(cq, cq[1:])]
    k_lens = [b - a for a, b in zip(ck, ck[1:])]
    _check_lengths(layout, q_lens, k_lens)
    n = len(q_lens)
    seqs = sequences([0] * n, cq[:-1], q_lens, ck[:-1], k_lens, q.device)
    layout = layout.to(q.device)
    dim = q.shape[-1]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    cfg = _config(q, layout, seqs.max_k, config, dim)
    q4, k4, v4 = q[None], k[None], v[None]
    out = new_varlen_output(q4, padded=False)
    return sparse_attention_fwd_varlen(q4, k4, v4, seqs, layout, scale, cfg, out)[0]


def sparse_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            seq_lens: torch.Tensor, layout: BlockLayout,
                            sm_scale: float | None = None,
                            config: LaunchConfig | None = None) -> torch.Tensor:
    """A left-padded batch: sequence ``b`` occupies the last ``seq_lens[b]`` positions.

    q: ``(batch, seq, heads, dim)``; k, v: ``(batch, seq, kv_heads, dim)``. Each sequence's pattern
    starts at its first real token (not at the padding). Padded output rows are zero.
    """
    _check_common(q, k, v, layout, 4, sm_scale, shape_hint="(batch, seq, heads, dim)")
    lens = _lengths("seq_lens", seq_lens)
    batch, seq = q.shape[0], q.shape[1]
    if k.shape[0] != batch or k.shape[1] != seq:
        raise ValueError(f"q and k must have one (batch, seq), got {tuple(q.shape[:2])} and "
                         f"{tuple(k.shape[:2])}")
    if len(lens) != batch:
        raise ValueError(f"seq_lens has {len(lens)} entries for a batch of {batch}")
    if max(lens) > seq:
        raise ValueError(f"seq_lens has {max(lens)}, longer than the padded length {seq}")
    _check_lengths(layout, lens, lens)
    pads = [seq - n for n in lens]
    seqs = sequences(list(range(batch)), pads, lens, pads, lens, q.device)
    layout = layout.to(q.device)
    dim = q.shape[-1]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    cfg = _config(q, layout, seqs.max_k, config, dim)
    out = new_varlen_output(q, padded=True)
    return sparse_attention_fwd_varlen(q, k, v, seqs, layout, scale, cfg, out)


def sparse_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, layout: BlockLayout,
                            sm_scale: float | None = None, num_splits: int | None = None,
                            config: LaunchConfig | None = None) -> torch.Tensor:
    """One decoding step with a KV cache.

    q: ``(batch, heads, dim)``, the newest token of each sequence; k_cache, v_cache:
    ``(batch, max_len, kv_heads, dim)``, already holding that token's k/v at position
    ``cache_seqlens[b] - 1``; lengths must lie in ``[1, max_len]`` (checked when
    ``cache_seqlens`` is on the CPU; on the GPU they are not read back, to avoid a sync per step).
    The pattern must cover ``max_len``. The pattern row of the new token's position decides which
    cached blocks are read. ``num_splits`` (split-K over kept blocks) is chosen to fill the GPU unless given.
    ``config`` overrides the launch config the lookup would pick for the "decode" kernel
    (``block_n`` keys per step, ``num_warps``, ``num_stages``; ``block_m`` is always 16).
    Returns ``(batch, heads, dim)``.
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k_cache, v_cache)):
        raise TypeError("q, k_cache and v_cache must be torch.Tensors")
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"q must be (batch, heads, dim) and the caches (batch, max_len, kv_heads, "
                         f"dim), got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    _check_common(q[:, None], k_cache, v_cache, layout, 4, sm_scale,
                  ("q", "k_cache", "v_cache"), "(batch, max_len, kv_heads, dim)")
    if not layout.causal:
        raise ValueError("decoding needs a causal layout (a new token sees only the past)")
    if (not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1
            or cache_seqlens.dtype.is_floating_point):
        raise TypeError("cache_seqlens must be a 1-D integer tensor")
    batch, max_len = k_cache.shape[0], k_cache.shape[1]
    if q.shape[0] != batch or cache_seqlens.shape[0] != batch:
        raise ValueError(f"q has batch {q.shape[0]}, the caches {batch}, cache_seqlens "
                         f"{cache_seqlens.shape[0]}")
    if cache_seqlens.device.type == "cpu":
        lens = cache_seqlens.tolist()
        if min(lens) < 1 or max(lens) > max_len:
            raise ValueError(f"cache_seqlens must be in [1, {max_len}] (the new token is already "
                             f"in the cache), got {min(lens)}..{max(lens)}")
    # Lengths on the GPU are not read back: a host sync per decoding step would cost more than
    # the step (the caller keeps them in [1, max_len], as with FlashAttention's kvcache API).
    layout.check_seqlen(max_len, 1)
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    if q.shape[1] // k_cache.shape[2] > 31:
        raise ValueError("decoding supports at most 31 query heads per kv head")
    layout = layout.to(q.device)
    dim = q.shape[-1]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    if config is None:
        # Checked by the lookup (a cached config that cannot run here is skipped): a decoding
        # step pays two dict lookups for its config.
        config = select.resolve_config("decode", q, layout, max_len)[0]
    else:
        check_config(config, layout.block_size, dim, "decode")
    lens_dev = cache_seqlens.to(device=q.device, dtype=torch.int32)
    return sparse_attention_decode_fwd(q, k_cache, v_cache, lens_dev, layout, scale, num_splits,
                                       config)
