"""A tensor-core step the warp-specialised Gluon kernels share (:mod:`kernels.fp8_ws`,
:mod:`kernels.bwd_dq_ws`): wait for a stage's tile, then start a product with its transpose."""

from __future__ import annotations

from .fwd_ws import GLUON

if GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma

    @gluon.jit
    def _issue_transposed(a_op, bufs, ready, j, layout: gl.constexpr):
        """Wait for step ``j``'s tile in the ring ``bufs`` and start ``a_op`` times its
        transpose from zero, K-major on both sides (not waited for): q kᵀ, dO vᵀ, or the fp8
        kernel's p v against vᵀ."""
        stages: gl.constexpr = bufs.shape[0]
        # Shapes through constexpr names: triton 3.6 cannot build a shape from .shape items.
        rows: gl.constexpr = a_op.shape[0]
        cols: gl.constexpr = bufs.shape[1]
        zero = gl.zeros([rows, cols], gl.float32, layout)
        s = j % stages
        mbarrier.wait(ready.index(s), (j // stages) & 1)
        return warpgroup_mma(a_op, bufs.index(s).permute((1, 0)), zero, use_acc=False,
                             is_async=True)

    @gluon.jit
    def _issue_transposed_into(a_op, bufs, ready, j, acc):
        """:func:`_issue_transposed` adding into ``acc`` instead of starting from zero."""
        stages: gl.constexpr = bufs.shape[0]
        s = j % stages
        mbarrier.wait(ready.index(s), (j // stages) & 1)
        return warpgroup_mma(a_op, bufs.index(s).permute((1, 0)), acc, is_async=True)
