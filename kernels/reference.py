"""Dense PyTorch reference: the same function as the kernels, through a full token mask.

It computes in float64 on the CPU and float32 on a GPU, and materialises the ``(heads, seq_q,
seq_k)`` mask, so keep it to problems of a few thousand tokens.
"""

from __future__ import annotations

import math

import torch

from .layout import BlockLayout, token_mask


def layout_head_index(num_heads: int, num_kv_heads: int, pattern_heads: int) -> torch.Tensor:
    """For each query head, the pattern head it reads (identity, its GQA group, or 0)."""
    if pattern_heads not in (1, num_kv_heads, num_heads):
        raise ValueError(
            f"the pattern has {pattern_heads} heads; expected 1, num_kv_heads={num_kv_heads} "
            f"or num_heads={num_heads}")
    return torch.arange(num_heads) // (num_heads // pattern_heads)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                        sm_scale: float | None = None, seq_dim: int = 1,
                        return_lse: bool = False, grad: bool = False):
    """Block-sparse attention by dense masked softmax.

    q: (batch, seq_q, heads, dim) with ``seq_dim=1`` or (batch, heads, seq_q, dim) with ``seq_dim=2``;
    k, v: the same with ``seq_k`` and ``kv_heads``. Returns the output in q's layout (float64 on
    the CPU, float32 on a GPU) and, with ``return_lse``, the natural-log log-sum-exp
    ``(batch, heads, seq_q)``. With ``grad`` the result stays attached to q, k and v's graph.
    """
    compute = torch.float64 if q.device.type == "cpu" else torch.float32
    if seq_dim == 1:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.to(compute) for t in (q, k, v))
    if not grad:
        q, k, v = q.detach(), k.detach(), v.detach()
    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale

    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = token_mask(layout.to(q.device), seq_k, seq_q)
    mask = mask[layout_head_index(heads, kv_heads, layout.heads).to(q.device)]  # (heads, sq, sk)

    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    if seq_dim == 1:
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
