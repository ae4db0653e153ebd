"""The bundled Triton block-sparse kernels: training forward/backward, varlen prefill, decoding
(from a contiguous or a paged KV cache).

The inference steps are made as an engine runs them, graph-ready: what depends only on the batch's
shape (varlen's sequence table, decode's workspace, split count and group plan) is built in
`prepare`, so a timed call reads nothing back and allocates nothing but varlen's output, and
`timing.cuda_graph` can capture it."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch

from kernels import (
    KERNELS,
    BlockLayout,
    LaunchConfig,
    decode_workspace,
    resolve_config,
    resolve_varlen_config,
    sparse_attention,
    sparse_attention_decode,
    sparse_attention_varlen,
    tile_plan,
    varlen_plan,
    varlen_sequences,
)

from ...names import BUNDLED_PROVIDER
from ...spec.sweep import FP8, Case, Sweep
from ..modes import sequence_lengths
from .base import Prepared, Provider
from .bundled_fp8 import prepare_fp8

# The kernel a mode's call runs first, the one a plain LaunchConfig pins; the training modes run
# the forward, and those with a backward its dk/dv ("bwd") and dq kernels after it.
_MODE_KERNEL = {"prefill_varlen": "varlen", "decode": "decode"}
_BACKWARD = ("bwd", "dq")


class BundledKernel(Provider):
    name = BUNDLED_PROVIDER
    computes = "pattern"
    compiles = True
    modes = ("fwd", "bwd", "fwd_bwd", "prefill_varlen", "decode")

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        """``config`` pins launch configs: a LaunchConfig for the mode's first kernel (the
        forward in the training modes), or a dict of kernel name -> LaunchConfig (the tuner's
        candidate of one kernel behind the winners of those tuned before it). What is not
        pinned comes from the spec's ``config`` (the forward's) or the lookup."""
        if case.dtype == FP8:  # the fp8 forward, on the case's bf16 inputs quantised
            return prepare_fp8(case, layout, sweep, device, scale, config)
        layout = layout.to(device)
        kernel = _MODE_KERNEL.get(case.mode, "fwd")
        pins = dict(config) if isinstance(config, Mapping) else (
            {} if config is None else {kernel: config})
        probe = torch.empty(1, 1, 1, case.head_dim, device=device, dtype=getattr(torch, case.dtype))
        if kernel in pins:
            main, source = pins[kernel], "explicit"
        elif sweep.config is not None and kernel != "decode":
            main, source = LaunchConfig(**sweep.config.model_dump()), "explicit"
        elif kernel == "varlen":
            main, source = resolve_varlen_config(probe, layout, case.seqlen)
        else:
            main, source = resolve_config(kernel, probe, layout, case.seqlen)
        # What the check's cut-down copy pins: the same configs (a dict when more than the first
        # kernel's are pinned).
        pinned = main if pins.keys() <= {kernel} else {**pins, kernel: main}
        if kernel == "decode":
            return self._decode(case, layout, device, scale, main, source)
        # Index forms are built here, outside the timed region.
        if kernel == "varlen":
            return self._varlen(case, layout, device, scale, main, source, pinned)
        tile_plan(layout, main.block_m, case.seqlen)
        # The backward's kernels that are not pinned are looked up at launch, by the lookup
        # that names them for the row here.
        given = {KERNELS[k].config_argument: pins[k] for k in _BACKWARD if k in pins}

        def attn(q, k, v):
            return sparse_attention(q, k, v, layout, sm_scale=scale, seq_dim=2, config=main,
                                    **given)

        if case.mode in ("bwd", "fwd_bwd"):
            backward = [(k, *_backward_config(k, pins, probe, layout, case.seqlen))
                        for k in _BACKWARD]
            label, source = _describe([("", main, source), *backward])
            return Prepared(attn, label, source, launch_config=pinned)
        return Prepared(attn, main.short(), source, launch_config=pinned)

    @staticmethod
    def _varlen(case: Case, layout: BlockLayout, device: torch.device, scale: float,
                config: LaunchConfig, source: str, pinned: object) -> Prepared:
        """Packed prefill: the sequence table of the case's lengths (those its inputs are drawn
        with) and the tile plan built once, so a call reads no cu_seqlens back."""
        cu = torch.tensor([0, *itertools.accumulate(sequence_lengths(case))], dtype=torch.int32)
        sequences = varlen_sequences(cu, cu, device)
        varlen_plan(layout, config.block_m, sequences.max_k)

        def attn(q, k, v, cu_seqlens, *_):
            return sparse_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, layout,
                                           sm_scale=scale, config=config, sequences=sequences)

        return Prepared(attn, config.short(), source, launch_config=pinned)

    @staticmethod
    def _decode(case: Case, layout: BlockLayout, device: torch.device, scale: float,
                config: LaunchConfig, source: str) -> Prepared:
        """A decoding step with a workspace made once: the output, the split count (the group
        plan built with it) and the splits' partials, so a call allocates nothing."""
        shape = torch.empty(case.batch, case.heads, case.head_dim, device=device,
                            dtype=getattr(torch, case.dtype))
        workspace = decode_workspace(shape, case.kv_heads, layout)

        def attn(q, k_cache, v_cache, cache_seqlens, lengths, paged=None):
            table = None
            if paged is not None:  # a paged case: the pages, through its block table
                k_cache, v_cache, table = paged
            return sparse_attention_decode(q, k_cache, v_cache, cache_seqlens, layout,
                                           sm_scale=scale, config=config, block_table=table,
                                           max_cache_len=case.seqlen, workspace=workspace)

        label = f"splits{workspace.splits} {config.short()}"
        if case.page_size:
            label += f" page{case.page_size}"
        return Prepared(attn, label, source, launch_config=config)


def _backward_config(kernel: str, pins: Mapping[str, LaunchConfig], probe: torch.Tensor,
                     layout: BlockLayout, seq_k: int) -> tuple[LaunchConfig, str]:
    """A backward kernel's config and its source: pinned, else what the launch will look up."""
    if kernel in pins:
        return pins[kernel], "explicit"
    return resolve_config(kernel, probe, layout, seq_k)


def _describe(parts: list[tuple[str, LaunchConfig, str]]) -> tuple[str, str]:
    """A row's config and config_source for several kernels: ``"m128n64w4s2, bwd m64n64w4s2,
    dq m64n32w4s2"``; one source when all agree, else one per kernel in the same order."""
    label = ", ".join(f"{kernel} {config.short()}".strip() for kernel, config, _ in parts)
    sources = [source for _, _, source in parts]
    return label, sources[0] if len(set(sources)) == 1 else ", ".join(sources)
