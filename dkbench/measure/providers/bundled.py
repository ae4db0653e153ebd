"""The bundled Triton block-sparse kernels: training forward/backward, varlen prefill, decoding."""

from __future__ import annotations

import torch

from kernels import (
    BlockLayout,
    LaunchConfig,
    sparse_attention,
    sparse_attention_decode,
    sparse_attention_varlen,
)
from kernels.attention import CONFIG_ARGUMENTS
from kernels.decode import auto_splits, group_plan
from kernels.fwd import tile_plan
from kernels.inference import resolve_varlen_config
from kernels.select import resolve_config
from kernels.varlen import varlen_plan

from ...spec.sweep import Case, Sweep
from .base import Prepared, Provider


class BundledKernel(Provider):
    name = "dkbench"
    computes = "pattern"
    modes = ("fwd", "bwd", "fwd_bwd", "prefill_varlen", "decode")

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        layout = layout.to(device)
        if case.mode == "decode":
            return self._decode(case, layout, device, scale)
        probe = torch.empty(1, 1, 1, case.head_dim, device=device, dtype=getattr(torch, case.dtype))
        if config is not None:
            source = "explicit"
        elif sweep.config is not None:
            config, source = LaunchConfig(**sweep.config.model_dump()), "explicit"
        elif case.mode == "prefill_varlen":
            config, source = resolve_varlen_config(probe, layout, case.seqlen)
        else:
            config, source = resolve_config("fwd", probe, layout, case.seqlen)
        # Index forms are built here, outside the timed region.
        if case.mode == "prefill_varlen":
            varlen_plan(layout, config.block_m, case.seqlen)

            def attn(q, k, v, cu_seqlens, *_):
                return sparse_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, layout,
                                               sm_scale=scale, config=config)
        else:
            tile_plan(layout, config.block_m, case.seqlen)
            backward = _backward_configs(case, probe, layout)

            def attn(q, k, v):
                return sparse_attention(q, k, v, layout, sm_scale=scale, seq_dim=2, config=config,
                                        **{arg: cfg for arg, (_, cfg, _) in backward.items()})

            if backward:
                label, source = _describe([("", config, source), *backward.values()])
                return Prepared(attn, label, source, launch_config=config)

        return Prepared(attn, config.short(), source, launch_config=config)

    @staticmethod
    def _decode(case: Case, layout: BlockLayout, device: torch.device, scale: float) -> Prepared:
        plan = group_plan(layout, case.heads, case.kv_heads)
        splits = auto_splits(case.batch, case.kv_heads, plan.max_entries, device)

        def attn(q, k_cache, v_cache, cache_seqlens, *_):
            return sparse_attention_decode(q, k_cache, v_cache, cache_seqlens, layout,
                                           sm_scale=scale, num_splits=splits)

        return Prepared(attn, f"splits{splits}", "auto")


def _backward_configs(case: Case, probe: torch.Tensor, layout: BlockLayout
                      ) -> dict[str, tuple[str, LaunchConfig, str]]:
    """For the modes with a backward: ``sparse_attention`` argument -> (kernel, config, source)
    of the dk/dv and dq kernels, looked up once here so that the row can name them."""
    if case.mode not in ("bwd", "fwd_bwd"):
        return {}
    looked_up = {}
    for kernel in ("bwd", "dq"):
        config, source = resolve_config(kernel, probe, layout, case.seqlen)
        looked_up[CONFIG_ARGUMENTS[kernel]] = (kernel, config, source)
    return looked_up


def _describe(parts: list[tuple[str, LaunchConfig, str]]) -> tuple[str, str]:
    """A row's config and config_source for several kernels: ``"m128n64w4s2, bwd m64n64w4s2,
    dq m64n32w4s2"``; one source when all agree, else one per kernel in the same order."""
    label = ", ".join(f"{kernel} {config.short()}".strip() for kernel, config, _ in parts)
    sources = [source for _, _, source in parts]
    return label, sources[0] if len(set(sources)) == 1 else ", ".join(sources)
