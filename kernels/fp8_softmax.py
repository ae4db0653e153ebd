"""The fp8 forwards' online-softmax step, shared by the Triton kernel (:mod:`kernels.fp8`) and
the Gluon one (:mod:`kernels.fp8_ws`): the probabilities come out scaled by ``2**P_SHIFT``, so
that their e4m3 rounding keeps its mantissa bits (see :mod:`kernels.fp8`'s docstring)."""

from __future__ import annotations

import triton
import triton.language as tl

# p = exp2(s - m + P_SHIFT) lies in [0, 2**P_SHIFT].
P_SHIFT = tl.constexpr(8.0)


@triton.jit
def _online_softmax_p8(qk, m_i, l_i, qk_scale):
    """:func:`kernels.common._online_softmax` with the probabilities (and so the row sum) scaled
    by ``2**P_SHIFT``, folded into the exponent's per-row offset: no extra pass over the tile."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - (m_new - P_SHIFT)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i
