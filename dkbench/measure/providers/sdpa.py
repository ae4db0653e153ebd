"""PyTorch's scaled_dot_product_attention, one provider per backend, on the dense problem."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import BlockLayout

from ...spec.sweep import Case, Sweep
from ..modes import sequence_lengths, unpad
from .base import Prepared, Provider, Unsupported, refuse_fp8


class _Sdpa(Provider):
    backend: SDPBackend
    computes = "dense"
    # A backend without grouped k/v runs a GQA case on k/v repeated to every query head, inside
    # the timed call: the same dense problem, at the cost a user of that backend pays.
    expands_gqa = False

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
        refuse_fp8(case, f"torch's scaled_dot_product_attention takes no float8 inputs (SDPA "
                         f"{self.backend.name} has no fp8 path); see the bf16 rows")
        gqa = case.heads != case.kv_heads
        expand = self.expands_gqa and gqa
        if expand:
            gqa = False
        backend = self.backend
        if case.mode == "decode":
            return self._decode(case, device, scale, gqa, expand)
        causal_kwargs: dict = {}
        if case.causal and case.q_len == case.seqlen:
            causal_kwargs["is_causal"] = True
        elif case.causal:
            # is_causal aligns the mask top-left; queries here are the last positions.
            if self.backend == SDPBackend.CUDNN_ATTENTION:
                raise Unsupported("cuDNN SDPA takes no bottom-right causal bias (q_len < seqlen)")
            causal_kwargs["attn_mask"] = _lower_right(case.q_len, case.seqlen)
        elif case.mode == "prefill_varlen":
            raise Unsupported("bidirectional prefill on right-padded inputs needs a padding mask "
                              "per sequence; not measured for SDPA")
        _probe(backend, case, device, gqa, causal_kwargs, expand)

        def sdpa(q, k, v):
            if expand:
                k, v = _repeat_kv(k, case.heads), _repeat_kv(v, case.heads)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa,
                                                      **causal_kwargs)

        if case.mode == "prefill_varlen":
            # Dense baseline on right-padded inputs: causal rows never see the padding keys.
            lengths = sequence_lengths(case)
            return Prepared(lambda q, k, v, cu, q_pad, k_pad, v_pad, *_: sdpa(q_pad, k_pad, v_pad),
                            _expanded_label(expand), canonical=lambda out: unpad(out, lengths))
        return Prepared(sdpa, _expanded_label(expand))

    def _decode(self, case: Case, device: torch.device, scale: float, gqa: bool,
                expand: bool) -> Prepared:
        """One new token against a right-padded cache, with a mask for each sequence's length."""
        backend = self.backend
        lengths = torch.tensor(sequence_lengths(case), device=device)
        mask = (torch.arange(case.seqlen, device=device)[None, :] < lengths[:, None])
        mask = mask[:, None, None, :]  # (batch, 1, 1, max_len)
        _probe(backend, case, device, gqa, {"attn_mask": mask[:1, :, :, :min(case.seqlen, 256)]},
               expand)

        def attn(q, k_cache, v_cache, *_):
            k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
            if expand:
                k, v = _repeat_kv(k, case.heads), _repeat_kv(v, case.heads)
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask,
                                                     scale=scale, enable_gqa=gqa)
            return out[:, :, 0]

        label = _expanded_label(expand)
        if case.page_size:
            # The inputs hold the case's pages gathered into a contiguous cache, outside timing.
            label = ", ".join(filter(None, (label, f"pages of {case.page_size} gathered into a "
                                                   "contiguous cache outside timing")))
        return Prepared(attn, label)


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, heads, seq, dim), each kv head to its group."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def _expanded_label(expand: bool) -> str:
    return "kv repeated to all heads" if expand else ""


def _probe(backend: SDPBackend, case: Case, device: torch.device, gqa: bool, kwargs: dict,
           expand: bool = False) -> None:
    """Run the backend once on a tiny problem of the case's kind; Unsupported with its reasons."""
    dtype = getattr(torch, case.dtype)
    seq = min(case.seqlen, 256)
    q_len = min(case.q_len, seq)
    bias = "attn_mask" in kwargs and _is_causal_bias(kwargs["attn_mask"])
    if "attn_mask" in kwargs and not bias:
        seq = kwargs["attn_mask"].shape[-1]  # a plain tensor mask fixes the key length
    q = torch.randn(1, case.heads, q_len, case.head_dim, device=device, dtype=dtype)
    kv_heads = case.heads if expand else case.kv_heads
    kv = torch.randn(1, kv_heads, seq, case.head_dim, device=device, dtype=dtype)
    kwargs = dict(kwargs)
    if bias:
        kwargs["attn_mask"] = _lower_right(q_len, seq)
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
    expands_gqa = True  # it refuses grouped k/v


class SdpaMath(_Sdpa):
    name = "sdpa_math"
    backend = SDPBackend.MATH


# torch.nn.attention.bias imports torch._dynamo (over a second, several on a machine without
# byte-code caches), which nothing else of a run or tune without FlexAttention needs: it is
# imported where a bottom-right causal mask is made.
def _lower_right(q_len: int, kv_len: int):
    """SDPA's causal mask aligned to the bottom right (queries are the last positions)."""
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(q_len, kv_len)


def _is_causal_bias(mask: object) -> bool:
    from torch.nn.attention.bias import CausalBias

    return isinstance(mask, CausalBias)
