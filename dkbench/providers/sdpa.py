"""PyTorch's scaled_dot_product_attention, one provider per backend, on the dense problem."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

from kernels import BlockLayout

from ..modes import sequence_lengths, unpad
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

    modes = ("fwd", "bwd", "fwd_bwd", "prefill_varlen", "decode")
    pads_inputs = True

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        gqa = case.heads != case.kv_heads
        backend = self.backend
        if case.mode == "decode":
            return self._decode(case, device, scale, gqa)
        causal_kwargs: dict = {}
        if case.causal and case.q_len == case.seqlen:
            causal_kwargs["is_causal"] = True
        elif case.causal:
            # is_causal aligns the mask top-left; queries here are the last positions.
            if self.backend == SDPBackend.CUDNN_ATTENTION:
                raise Unsupported("cuDNN SDPA takes no bottom-right causal bias (q_len < seqlen)")
            causal_kwargs["attn_mask"] = causal_lower_right(case.q_len, case.seqlen)
        elif case.mode == "prefill_varlen":
            raise Unsupported("bidirectional prefill on right-padded inputs needs a padding mask "
                              "per sequence; not measured for SDPA")
        _probe(backend, case, device, gqa, causal_kwargs)

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa,
                                                      **causal_kwargs)

        if case.mode == "prefill_varlen":
            # Dense baseline on right-padded inputs: causal rows never see the padding keys.
            lengths = sequence_lengths(case)
            return Prepared(lambda q, k, v, cu, q_pad, k_pad, v_pad, *_: sdpa(q_pad, k_pad, v_pad),
                            canonical=lambda out: unpad(out, lengths))
        return Prepared(sdpa)

    def _decode(self, case: Case, device: torch.device, scale: float, gqa: bool) -> Prepared:
        """One new token against a right-padded cache, with a mask for each sequence's length."""
        backend = self.backend
        lengths = torch.tensor(sequence_lengths(case), device=device)
        mask = (torch.arange(case.seqlen, device=device)[None, :] < lengths[:, None])
        mask = mask[:, None, None, :]  # (batch, 1, 1, max_len)
        _probe(backend, case, device, gqa, {"attn_mask": mask[:1, :, :, :min(case.seqlen, 256)]})

        def attn(q, k_cache, v_cache, *_):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(
                    q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                    attn_mask=mask, scale=scale, enable_gqa=gqa)
            return out[:, :, 0]

        return Prepared(attn)


def _probe(backend: SDPBackend, case: Case, device: torch.device, gqa: bool, kwargs: dict) -> None:
    """Run the backend once on a tiny problem of the case's kind; Unsupported with its reasons."""
    dtype = getattr(torch, case.dtype)
    seq = min(case.seqlen, 256)
    q_len = min(case.q_len, seq)
    bias = isinstance(kwargs.get("attn_mask"), CausalBias)
    if "attn_mask" in kwargs and not bias:
        seq = kwargs["attn_mask"].shape[-1]  # a plain tensor mask fixes the key length
    q = torch.randn(1, case.heads, q_len, case.head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, case.kv_heads, seq, case.head_dim, device=device, dtype=dtype)
    kwargs = dict(kwargs)
    if bias:
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
