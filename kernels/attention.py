"""The public API: argument checks, the autograd Function, the functional API and the modules.

Every check happens here, once, in Python, before a kernel is launched: a bad call raises a
``ValueError`` or ``TypeError`` that names the argument, never a Triton compile error.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import select
from .bwd import sparse_attention_bwd
from .bwd_fused import sparse_attention_bwd_fused
from .checks import (
    check_batch,
    check_config_type,
    check_flag,
    check_heads,
    check_scale,
    check_seq_dim,
    check_tensors,
)
from .configs import LaunchConfig, check_config
from .dispatch import choose_impl
from .fwd import sparse_attention_fwd
from .layout import BlockLayout, local_stride_layout
from .outside_compile import outside_compile
from .registry import KERNELS

# The argument of :func:`sparse_attention` that pins each kernel's launch config (kernel name ->
# keyword), for the kernels it runs (their record's entry).
CONFIG_ARGUMENTS = {name: record.config_argument for name, record in KERNELS.items()
                    if record.entry == "sparse_attention"}


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                  seq_dim: int, sm_scale: float | None) -> None:
    check_tensors(("q", "k", "v"), (q, k, v), 4,
                  "(batch, seq, heads, dim) with seq_dim=1 or (batch, heads, seq, dim) with seq_dim=2")
    check_seq_dim(seq_dim)
    check_scale(sm_scale)
    check_batch("q", q.shape[0])
    head_axis = 3 - seq_dim
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have one batch size, got {q.shape[0]} and {k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q and k must have one head_dim, got {q.shape[3]} and {k.shape[3]}")
    check_heads(q.shape[head_axis], k.shape[head_axis], q.shape[3], layout)
    layout.check_seqlen(k.shape[seq_dim], q.shape[seq_dim])


# torch.func's wrapper tests (torch._C._functorch, present in every torch this supports).
_WRAPPER_TESTS = ("is_gradtrackingtensor", "is_batchedtensor", "is_legacy_batchedtensor")


def _functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torch.func transform's wrapper (grad tracking or vmap batched, or the
    legacy batching of ``is_grads_batched``): the kernels read raw storage, which such a wrapper
    has none of."""
    functorch = getattr(torch._C, "_functorch", None)  # private: looked up, not assumed
    return any(test(t) for test in (getattr(functorch, name, None) for name in _WRAPPER_TESTS)
               if test is not None)


def _check_training(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    sm_scale: float | torch.Tensor | None) -> None:
    """What autograd cannot get through the kernels: a learned scale, and torch.func transforms."""
    if any(isinstance(t, torch.Tensor) and _functorch_wrapped(t) for t in (q, k, v)):
        raise RuntimeError("sparse_attention does not support torch.func transforms (grad, vmap, "
                           "jacrev, jvp, ...): differentiate it with torch.autograd.grad or "
                           ".backward()")
    refuse_scale_grad(sm_scale)


def refuse_scale_grad(sm_scale: float | torch.Tensor | None) -> None:
    """A tensor ``sm_scale`` asking for a gradient, which the kernels (taking it as a number)
    would silently not give."""
    if isinstance(sm_scale, torch.Tensor) and sm_scale.requires_grad and torch.is_grad_enabled():
        raise ValueError("sm_scale requires grad, but the kernels take it as a number and give it "
                         "no gradient; pass a float or sm_scale.detach()")


def _checked_config(name: str, config: LaunchConfig, block_size: int, dim: int,
                    kernel: str) -> None:
    """check_config, its message naming the argument that gave the config."""
    try:
        check_config(config, block_size, dim, kernel)
    except ValueError as e:
        raise ValueError(f"{e} (the {name} argument)") from None


class _SparseAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, sm_scale, fwd_config, bwd_configs, return_lse):
        out, lse = sparse_attention_fwd(q, k, v, layout, sm_scale, fwd_config, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.sm_scale, ctx.bwd_configs = layout, sm_scale, bwd_configs
        if return_lse:
            ctx.mark_non_differentiable(lse)
            return out, lse
        return out

    @staticmethod
    def backward(ctx, grad_out, *unused):
        if torch.is_grad_enabled():
            # create_graph=True asks for a differentiable backward, which the kernels are not.
            raise RuntimeError("double backward through the block-sparse attention is not "
                               "supported (the backward kernels are not differentiable)")
        if _functorch_wrapped(grad_out):
            # vmap over the backward hands the kernels a batched grad they cannot read.
            raise RuntimeError("the block-sparse attention's backward cannot run batched "
                               "(torch.autograd.grad(..., is_grads_batched=True), "
                               "torch.autograd.functional.jacobian(vectorize=True), vmap): "
                               "take one grad_outputs at a time")
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = gradients(grad_out, q, k, v, out, lse, ctx.layout, ctx.sm_scale,
                               *ctx.bwd_configs)
        return dq, dk, dv, None, None, None, None, None


def gradients(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, layout: BlockLayout, sm_scale: float,
              dkdv_given: LaunchConfig | None = None, dq_given: LaunchConfig | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of checked ``(batch, heads, seq, dim)`` views from the forward's output and
    LSE: the backward's kernels at the given configs, or those looked up."""
    dkdv_config = dkdv_given or _looked_up("bwd", q, layout, k.shape[2])
    if choose_impl("bwd", dkdv_config.impl, q.device, q.dtype).impl == "fused":
        # One kernel takes dq too: there is no dq kernel, so no dq config is looked up and
        # a given one is unused.
        return sparse_attention_bwd_fused(grad_out, q, k, v, out, lse, layout, sm_scale,
                                          dkdv_config)
    dq_config = dq_given or _looked_up("dq", q, layout, k.shape[2])
    return sparse_attention_bwd(grad_out, q, k, v, out, lse, layout, sm_scale, dkdv_config,
                                dq_config)


def _looked_up(kernel: str, q: torch.Tensor, layout: BlockLayout, seq_k: int) -> LaunchConfig:
    config = select.resolve_config(kernel, q, layout, seq_k)[0]
    check_config(config, layout.block_size, q.shape[3], kernel)
    return config


@outside_compile
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                     sm_scale: float | None = None, seq_dim: int = 1, return_lse: bool = False,
                     config: LaunchConfig | None = None, bwd_config: LaunchConfig | None = None,
                     dq_config: LaunchConfig | None = None):
    """Block-sparse attention ``softmax(sm_scale * q kᵀ + mask) v`` over the layout's kept blocks.

    q: ``(batch, seq_q, heads, dim)`` (``seq_dim=1``) or ``(batch, heads, seq_q, dim)``
    (``seq_dim=2``); k, v: the same with ``seq_k >= seq_q`` and ``kv_heads`` dividing ``heads``.
    Queries are the last ``seq_q`` of the ``seq_k`` positions. Any strides; float16, bfloat16 or
    float32. ``sm_scale`` defaults to ``1/sqrt(dim)``. Returns the output in q's layout, and with
    ``return_lse`` also the natural-log log-sum-exp ``(batch, heads, seq_q)`` in float32.
    ``config``/``bwd_config``/``dq_config`` override the launch configs the lookup would pick
    for the forward, the backward's dk/dv kernel and its dq kernel. A ``bwd_config`` with
    ``impl="fused"`` (or a tuned one) runs the fused backward, whose dk/dv kernel takes dq too:
    ``dq_config`` is then unused (still checked). Differentiable in q, k and v (once: double
    backward raises; the LSE is not differentiable, and a tensor ``sm_scale`` that requires grad
    is refused, as are torch.func transforms).
    """
    _check_training(q, k, v, sm_scale)
    if isinstance(sm_scale, torch.Tensor):
        sm_scale = sm_scale.detach()  # no gradient to give it (and none asked: checked above)
    _check_inputs(q, k, v, layout, seq_dim, sm_scale)
    check_flag("return_lse", return_lse)
    for name, given in (("config", config), ("bwd_config", bwd_config), ("dq_config", dq_config)):
        check_config_type(name, given)
    layout = layout.to(q.device)
    dim = q.shape[3]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    if seq_dim == 1:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    seq_k = k.shape[2]
    if config is not None:
        _checked_config("config", config, layout.block_size, dim, "fwd")
    fwd_config = config or select.resolve_config("fwd", q, layout, seq_k)[0]
    check_config(fwd_config, layout.block_size, dim)
    for name, kernel, given in (("bwd_config", "bwd", bwd_config), ("dq_config", "dq", dq_config)):
        if given is not None:
            _checked_config(name, given, layout.block_size, dim, kernel)
    result = _SparseAttentionFn.apply(q, k, v, layout, scale, fwd_config,
                                      (bwd_config, dq_config), return_lse)
    out, lse = result if return_lse else (result, None)
    if seq_dim == 1:
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


class SparseAttention(nn.Module):
    """Block-sparse attention with a user pattern ``(heads or 1, q_blocks, k_blocks)``."""

    def __init__(self, block_size: int, pattern: torch.Tensor, causal: bool = True,
                 seq_dim: int = 1, warn_kv_cache: bool = True):
        super().__init__()
        check_seq_dim(seq_dim)
        self.layout = BlockLayout.from_pattern(pattern, block_size, causal,
                                               warn_kv_cache=warn_kv_cache)
        self.seq_dim = seq_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                sm_scale: float | None = None, return_lse: bool = False,
                config: LaunchConfig | None = None, bwd_config: LaunchConfig | None = None,
                dq_config: LaunchConfig | None = None):
        """:func:`sparse_attention` with this module's layout and ``seq_dim``."""
        return sparse_attention(q, k, v, self.layout, sm_scale, self.seq_dim, return_lse, config,
                                bwd_config, dq_config)

    def extra_repr(self) -> str:
        return f"{self.layout.description}, causal={self.layout.causal}, seq_dim={self.seq_dim}"


class LocalStrideSparseAttention(SparseAttention):
    """The phi-3-small local-stride pattern (see :func:`kernels.layout.local_stride_layout`)."""

    def __init__(self, num_heads: int, max_seq_len: int, block_size: int, local_blocks: int,
                 vert_stride: int, homo_head: bool = False, num_kv_heads: int | None = None,
                 head_sliding_step: int | None = None, head_sliding_offset: int = 0,
                 num_dense_heads: int = 0, causal: bool = True, seq_dim: int = 1):
        nn.Module.__init__(self)
        check_seq_dim(seq_dim)
        self.layout = local_stride_layout(
            num_heads, max_seq_len, block_size, local_blocks, vert_stride, homo_head=homo_head,
            num_kv_heads=num_kv_heads, head_sliding_step=head_sliding_step,
            head_sliding_offset=head_sliding_offset, num_dense_heads=num_dense_heads, causal=causal)
        self.seq_dim = seq_dim
