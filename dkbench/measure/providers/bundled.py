"""The bundled Triton block-sparse kernels: training forward/backward, varlen prefill, decoding
(from a contiguous or a paged KV cache)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kernels import (
    KERNELS,
    BlockLayout,
    LaunchConfig,
    auto_splits,
    group_plan,
    resolve_config,
    resolve_varlen_config,
    sparse_attention,
    sparse_attention_decode,
    sparse_attention_varlen,
    tile_plan,
    varlen_plan,
)

from ...spec.sweep import Case, Sweep
from .base import Prepared, Provider

# The kernel a mode's call runs first, the one a plain LaunchConfig pins; the training modes run
# the forward, and those with a backward its dk/dv ("bwd") and dq kernels after it.
_MODE_KERNEL = {"prefill_varlen": "varlen", "decode": "decode"}
_BACKWARD = ("bwd", "dq")


class BundledKernel(Provider):
    name = "dkbench"
    computes = "pattern"
    modes = ("fwd", "bwd", "fwd_bwd", "prefill_varlen", "decode")

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        """``config`` pins launch configs: a LaunchConfig for the mode's first kernel (the
        forward in the training modes), or a dict of kernel name -> LaunchConfig (the tuner's
        candidate of one kernel behind the winners of those tuned before it). What is not
        pinned comes from the spec's ``config`` (the forward's) or the lookup."""
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
            varlen_plan(layout, main.block_m, case.seqlen)

            def attn(q, k, v, cu_seqlens, *_):
                return sparse_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, layout,
                                               sm_scale=scale, config=main)

            return Prepared(attn, main.short(), source, launch_config=pinned)
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
    def _decode(case: Case, layout: BlockLayout, device: torch.device, scale: float,
                config: LaunchConfig, source: str) -> Prepared:
        plan = group_plan(layout, case.heads, case.kv_heads)
        splits = auto_splits(case.batch, case.kv_heads, plan.max_entries, device)

        def attn(q, k_cache, v_cache, cache_seqlens, lengths, paged=None):
            table = None
            if paged is not None:  # a paged case: the pages, through its block table
                k_cache, v_cache, table = paged
            return sparse_attention_decode(q, k_cache, v_cache, cache_seqlens, layout,
                                           sm_scale=scale, num_splits=splits, config=config,
                                           block_table=table, max_cache_len=case.seqlen)

        label = f"splits{splits} {config.short()}"
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
