"""PyTorch's scaled_dot_product_attention, one provider per backend, on the dense problem."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import BlockLayout

from ..spec import Case, Sweep
from .base import Prepared, Provider, Unsupported


class _Sdpa(Provider):
    backend: SDPBackend
    computes = "dense"

    def unavailable(self, device: torch.device) -> str | None:
        if self.backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                            SDPBackend.EFFICIENT_ATTENTION) and device.type != "cuda":
            return f"the SDPA {self.backend.name} backend needs a CUDA GPU"
        if self.backend == SDPBackend.CUDNN_ATTENTION and not torch.backends.cudnn.is_available():
            return "cuDNN is not available in this torch build"
        return None

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        gqa = case.heads != case.kv_heads
        causal_kwargs: dict = {}
        if case.causal and case.q_len == case.seqlen:
            causal_kwargs["is_causal"] = True
        elif case.causal:
            # is_causal aligns the mask top-left; queries here are the last positions.
            from torch.nn.attention.bias import causal_lower_right
            if self.backend == SDPBackend.CUDNN_ATTENTION:
                raise Unsupported("cuDNN SDPA takes no bottom-right causal bias (q_len < seqlen)")
            causal_kwargs["attn_mask"] = causal_lower_right(case.q_len, case.seqlen)
        backend = self.backend
        _probe(backend, case, device, gqa, causal_kwargs)

        def attn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa,
                                                      **causal_kwargs)

        return Prepared(attn)


def _probe(backend: SDPBackend, case: Case, device: torch.device, gqa: bool, kwargs: dict) -> None:
    """Run the backend once on a tiny problem of the case's kind; Unsupported with its reasons."""
    dtype = getattr(torch, case.dtype)
    seq = min(case.seqlen, 256)
    q_len = min(case.q_len, seq)
    q = torch.randn(1, case.heads, q_len, case.head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, case.kv_heads, seq, case.head_dim, device=device, dtype=dtype)
    kwargs = dict(kwargs)
    if "attn_mask" in kwargs:
        from torch.nn.attention.bias import causal_lower_right
        kwargs["attn_mask"] = causal_lower_right(q_len, seq)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, kv, kv, enable_gqa=gqa, **kwargs)
        except RuntimeError as exc:
            if "No available kernel" not in str(exc):
                raise
            reasons = "; ".join(str(w.message).strip().splitlines()[0] for w in caught)
            raise Unsupported(f"SDPA {backend.name} cannot run this case"
                              + (f": {reasons}" if reasons else "")) from None


class SdpaFlash(_Sdpa):
    name = "sdpa_flash"
    backend = SDPBackend.FLASH_ATTENTION


class SdpaCudnn(_Sdpa):
    name = "sdpa_cudnn"
    backend = SDPBackend.CUDNN_ATTENTION


class SdpaEfficient(_Sdpa):
    name = "sdpa_efficient"
    backend = SDPBackend.EFFICIENT_ATTENTION


class SdpaMath(_Sdpa):
    name = "sdpa_math"
    backend = SDPBackend.MATH
