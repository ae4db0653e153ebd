"""Which implementation runs a kernel: the one place that decides, and says why.

A launch config names the implementation it asks for (``LaunchConfig.impl``, one of its kernel
record's ``impls``). Whether that one can run depends on the device and dtype and, at launch, on
the call's tensors: the forward's warp-specialised Gluon kernel (:mod:`kernels.fwd_ws`) needs
Hopper, 16-bit inputs, a triton with Gluon, and tensors that tensor-memory copies can read. What
it cannot take runs the record's first implementation, the Triton kernel. The forward's default
(:func:`kernels.configs.default_config`) and its launcher (:func:`kernels.fwd.sparse_attention_fwd`)
both ask :func:`choose_impl`; the varlen and decode kernels have the Triton one only.

The backward's dk/dv kernel ("bwd") has a second implementation, "fused"
(:mod:`kernels.bwd_fused`): the same Triton kernel taking dq too, with fp32 atomics, and no dq
kernel. It runs wherever the Triton one does (float32 atomic adds exist on every CUDA GPU and in
the interpreter), so a config asking for it always gets it; but it is only ever asked for (an
explicit ``bwd_config``, or a tuned entry), never the default, until the GPU measures it against
the two kernels (kernels/PERF.md). The backward of :mod:`kernels.attention` asks
:func:`choose_impl` which of the two to launch.

The dq and dk/dv kernels have Gluon implementations too (:mod:`kernels.bwd_dq_ws`,
:mod:`kernels.bwd_dkdv_ws`), with the Gluon forward's rules and dO's strides as well;
:func:`kernels.bwd.sparse_attention_bwd` and :func:`kernels.bwd.launch_dkdv` ask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import bwd_dq_ws, fwd_ws
from .registry import KERNELS


@dataclass(frozen=True)
class Choice:
    """The implementation that runs, and why (one line, for a row's message or a log)."""

    impl: str
    reason: str


def gluon_unavailable(capability: tuple[int, int] | None, dtype: torch.dtype) -> str | None:
    """Why the Gluon forward cannot run on a device of this compute capability (None: not a
    CUDA device) for this dtype, or None when it can."""
    return fwd_ws.unavailable(capability, dtype)


def choose_impl(kernel: str, impl: str, device: torch.device, dtype: torch.dtype,
                call: tuple | None = None, tma: bool = True) -> Choice:
    """The implementation that runs ``kernel`` for a config asking for ``impl`` on ``device``
    with ``dtype``; with ``call`` (the launch's ``(q, k, v, layout)``, and dO after them for
    the backward's kernels) and ``tma`` (whether tensor-memory copies may be used), for that
    call's shapes and strides too."""
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; the kernels are {', '.join(KERNELS)}")
    record = KERNELS[kernel]
    fallback = record.impls[0]
    if impl not in record.impls:
        return Choice(fallback, f"the {kernel} kernel has no impl={impl!r}; impl={fallback!r} runs")
    if impl == "fused":
        return Choice("fused", "impl='fused', as the config asks: dq accumulates in the dk/dv "
                               "kernel (fp32 atomics) and the dq config is unused")
    if impl != "gluon":
        return Choice(impl, f"impl={impl!r}, as the config asks")
    if call is not None:
        # The backward's calls also name dO, which their tensor-memory copies read too.
        why = (bwd_dq_ws.refusal(*call, tma=tma) if kernel in ("dq", "bwd")
               else fwd_ws.refusal(*call, tma=tma))
    else:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        why = gluon_unavailable(capability, dtype)
    if why:
        return Choice(fallback, f"{why}; impl={fallback!r} runs instead")
    return Choice("gluon", "impl='gluon', as the config asks: Hopper, 16-bit, and a call it takes")
