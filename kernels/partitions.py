"""Context parallelism: attention of a sequence's queries against one segment of its keys, and the
merge of such partial results into attention over all of them.

A context-parallel step (ring or all-gather) runs :func:`sparse_attention_partition` once per
key segment that reaches a rank and :func:`combine_attn_partitions` once at the end. Each
partial output is normalised by its own segment's softmax sum and comes with that segment's
log-sum-exp, so the merge is exact: ``lse = logsumexp_i lse_i`` and
``out = sum_i exp(lse_i - lse) * out_i``. The partition runs the forward kernel
(:mod:`kernels.fwd`, the "fwd" record's configs) with the queries' and keys' absolute positions;
both functions are forward-only (no gradients).
"""

from __future__ import annotations

import math

import torch

from . import select
from .checks import (
    check_config_type,
    check_heads,
    check_inference_only,
    check_same_shape,
    check_scale,
    check_seq_dim,
    check_strided,
    check_tensors,
)
from .configs import LaunchConfig, check_config
from .fwd import sparse_attention_fwd
from .layout import BlockLayout, is_int
from .outside_compile import outside_compile

_SHAPES = "(batch, seq, heads, dim) with seq_dim=1 or (batch, heads, seq, dim) with seq_dim=2"


def _check_position(name: str, value: int) -> None:
    if not is_int(value):  # numpy ints pass, as for every other count (stored as ints)
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_partition(q: torch.Tensor, k_seg: torch.Tensor, v_seg: torch.Tensor,
                     layout: BlockLayout, q_start: int, k_start: int, sm_scale: float | None,
                     seq_dim: int) -> None:
    names = ("q", "k_seg", "v_seg")
    check_tensors(names, (q, k_seg, v_seg), 4, _SHAPES)
    check_seq_dim(seq_dim)
    check_scale(sm_scale)
    check_inference_only(names, (q, k_seg, v_seg), "sparse_attention_partition is")
    check_same_shape(names[1:], k_seg, v_seg)
    if (q.shape[0], q.shape[3]) != (k_seg.shape[0], k_seg.shape[3]):
        raise ValueError(f"q and k_seg must have one batch size and head_dim, got shapes "
                         f"{tuple(q.shape)} and {tuple(k_seg.shape)}")
    check_heads(q.shape[3 - seq_dim], k_seg.shape[3 - seq_dim], q.shape[3], layout)
    _check_position("q_start", q_start)
    _check_position("k_start", k_start)
    bs = layout.block_size
    if k_start % bs:
        raise ValueError(f"k_start must be a multiple of the layout's block size {bs}, got {k_start}: "
                         "segments start on block boundaries")
    seq_q, seg_len = q.shape[seq_dim], k_seg.shape[seq_dim]
    if seq_q < 1 or seg_len < 1:
        raise ValueError(f"q and k_seg must hold at least one position each, got {seq_q} queries and "
                         f"{seg_len} keys")
    q_end, k_end = q_start + seq_q, k_start + seg_len
    if math.ceil(q_end / bs) > layout.q_blocks or math.ceil(k_end / bs) > layout.k_blocks:
        raise ValueError(f"the pattern covers {layout.q_blocks}x{layout.k_blocks} blocks of {bs} "
                         f"tokens, too few for queries up to position {q_end} and keys up to "
                         f"{k_end} (q_start + seq_q, k_start + seg_len)")


@outside_compile
def sparse_attention_partition(q: torch.Tensor, k_seg: torch.Tensor, v_seg: torch.Tensor,
                               layout: BlockLayout, q_start: int, k_start: int,
                               sm_scale: float | None = None, seq_dim: int = 1,
                               config: LaunchConfig | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of one sequence's queries against one segment of its keys.

    q: ``(batch, seq_q, heads, dim)`` (``seq_dim=1``) or ``(batch, heads, seq_q, dim)``
    (``seq_dim=2``), the queries at absolute positions ``q_start .. q_start + seq_q - 1`` (any
    ``q_start >= 0``); k_seg, v_seg: the same with ``seg_len`` and ``kv_heads``, the keys at
    ``k_start .. k_start + seg_len - 1``, ``k_start`` a multiple of the layout's block size. The
    pattern and the causal mask apply by absolute position: the query at ``i`` sees the key at
    ``j`` when the pattern keeps block ``(i // block_size, j // block_size)`` and, if causal,
    ``j <= i``. GQA, any strides; float16, bfloat16 or float32; ``sm_scale`` defaults to
    ``1/sqrt(dim)``.

    Returns ``(out, lse)``: ``out`` in q's layout and dtype, normalised by this segment's own
    softmax sum, and the natural-log log-sum-exp ``(batch, heads, seq_q)`` float32 over the
    segment's keys; a row that sees none of them has ``out`` 0 and ``lse`` -inf. Merge the
    segments' results with :func:`combine_attn_partitions`. ``config`` pins the forward's launch
    config (a Triton one: partitions load keys through pointers; a config asking for the Gluon
    kernel is refused, and a looked-up one runs the Triton default instead). Inference-only: no
    gradients.
    """
    _check_partition(q, k_seg, v_seg, layout, q_start, k_start, sm_scale, seq_dim)
    q_start, k_start = int(q_start), int(k_start)
    check_config_type("config", config)
    if config is not None and config.impl != "triton":
        raise ValueError(f"config {config.short()}: partitions run the Triton forward kernel; give "
                         "a config with impl='triton'")
    layout = layout.to(q.device)
    dim = q.shape[3]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    if seq_dim == 1:
        q, k_seg, v_seg = (t.transpose(1, 2) for t in (q, k_seg, v_seg))
    extent = max(q_start + q.shape[2], k_start + k_seg.shape[2])
    config = config or select.resolve_config("fwd", q, layout, extent)[0]
    check_config(config, layout.block_size, dim)
    out, lse = sparse_attention_fwd(q, k_seg, v_seg, layout, scale, config,
                                    starts=(q_start, k_start))
    return (out.transpose(1, 2) if seq_dim == 1 else out), lse


def _check_parts(outs, lses, seq_dim: int) -> None:
    for name, parts in (("outs", outs), ("lses", lses)):
        if not isinstance(parts, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(parts).__name__}")
        if not parts:
            raise ValueError(f"{name} is empty: give one result per key segment")
        for i, t in enumerate(parts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            check_strided(f"{name}[{i}]", t)
    if len(outs) != len(lses):
        raise ValueError(f"outs and lses must have one entry per segment, got {len(outs)} and "
                         f"{len(lses)}")
    check_seq_dim(seq_dim)
    first = outs[0]
    if first.dim() != 4 or not first.is_floating_point():
        raise ValueError(f"outs[0] must be a 4-D float tensor {_SHAPES}, got shape "
                         f"{tuple(first.shape)} and dtype {first.dtype}")
    batch, seq, heads = first.shape[0], first.shape[seq_dim], first.shape[3 - seq_dim]
    for name, parts, shape in (("outs", outs, first.shape), ("lses", lses, (batch, heads, seq))):
        for i, t in enumerate(parts):
            if t.shape != shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected {tuple(shape)} "
                                 f"(outs {_SHAPES}; lses (batch, heads, seq))")
            if not t.is_floating_point() or (name == "outs" and t.dtype != first.dtype):
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; the outs must share one float "
                                f"dtype ({first.dtype}, outs[0]'s) and the lses be float")
            if t.device != first.device:
                raise ValueError(f"{name}[{i}] is on {t.device}, outs[0] on {first.device}")
            if name == "lses" and t.device.type == "cpu":
                _check_lse_values(i, t)


def _check_lse_values(i: int, lse: torch.Tensor) -> None:
    """No log-sum-exp is NaN or +inf (-inf is a row that saw no key): either would make every
    merged row NaN. Checked on the host only, where reading the values costs no sync."""
    bad = lse.isnan() | lse.isposinf()
    if bool(bad.any()):
        raise ValueError(f"lses[{i}] holds {lse[bad].flatten()[0].item()}; a log-sum-exp is "
                         "finite, or -inf for a row that saw no key of the segment")


def combine_attn_partitions(outs: list[torch.Tensor] | tuple[torch.Tensor, ...],
                            lses: list[torch.Tensor] | tuple[torch.Tensor, ...], seq_dim: int = 1
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the partial attention results of disjoint key segments of one set of queries.

    outs: one output per segment, ``(batch, seq, heads, dim)`` (``seq_dim=1``) or ``(batch,
    heads, seq, dim)`` (``seq_dim=2``), each normalised by its own segment's softmax sum; lses:
    the matching natural-log log-sum-exps ``(batch, heads, seq)``, -inf where a row saw no key of
    the segment (what :func:`sparse_attention_partition` returns). Returns ``(out, lse)`` over
    the union of the segments: ``lse = logsumexp_i lse_i`` (float32) and
    ``out = sum_i exp(lse_i - lse) * out_i``, computed in float32 and returned in the outs'
    dtype and layout. Rows that no segment reaches come out 0 with lse -inf.
    """
    _check_parts(outs, lses, seq_dim)
    lse_all = torch.stack([lse.float() for lse in lses])  # (segments, batch, heads, seq)
    lse = torch.logsumexp(lse_all, dim=0)
    # Rows no segment reaches: exp(-inf - 0) weighs every segment 0, where exp(-inf - -inf)
    # would be nan.
    weights = torch.exp(lse_all - torch.where(lse.isneginf(), 0.0, lse))
    if seq_dim == 1:
        weights = weights.transpose(2, 3)  # (segments, batch, seq, heads)
    out = torch.zeros(outs[0].shape, device=outs[0].device, dtype=torch.float32)
    for weight, part in zip(weights, outs):
        out.addcmul_(weight[..., None], part)
    return out.to(outs[0].dtype), lse
