"""One record per kernel: what the config cache hashes, which implementations run it, which
public function runs it and how a call pins its launch config, whether it is tuned, and where.

Everything that needs to know about a kernel (the cache key's source hash, the config arguments
of :func:`kernels.sparse_attention`, the tuner's kernels and spaces, the CLI's help) reads it
from here. The rules that need torch live beside the code they describe, keyed by these names:
``kernels.configs.default_config(kernel, ...)`` and ``config_problems(..., kernel)`` (defaults and
validity), ``kernels.dispatch.choose_impl`` (which implementation runs). Standard library only,
and no import of the other kernels modules: they import this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# The axes of a launch config (kernels.configs.LaunchConfig), in order.
AXES = ("block_m", "block_n", "num_warps", "num_stages", "impl")


@dataclass(frozen=True)
class KernelRecord:
    """What the library and the harness know about one kernel."""

    name: str
    description: str  # one line, shown in help
    # The modules whose source keys the kernel's cached configs (``select.kernel_hash``), in
    # hashing order: the module that defines the kernel and every module it takes jit helpers
    # or index tables from. Reordering or adding one changes the hash, so shipped configs stop
    # applying.
    sources: tuple[str, ...]
    impls: tuple[str, ...]  # LaunchConfig.impl values that can run it; the first is the fallback
    entry: str  # the public function of kernels that runs it
    config_argument: str  # the keyword of ``entry`` that pins its launch config
    tunable: bool  # its launch configs are worth searching
    # What the config's fields mean for this kernel (help text).
    config_meaning: str
    # The values a GPU tune searches per axis of :data:`AXES` (``impl``: its ``impls``); the
    # tuner caps block_n, and the dk/dv kernel's block_m, at the sparse block size.
    search_space: Mapping[str, tuple] = field(hash=False)


def _space(impls: tuple[str, ...], **tiles: tuple[int, ...]) -> Mapping[str, tuple]:
    return MappingProxyType({**tiles, "impl": impls})


_FWD_IMPLS = ("triton", "gluon")
# The backward's dk/dv kernel alone (with the dq kernel), or fused, taking dq too (with atomics),
# or warp-specialised Gluon on Hopper (with the dq kernel).
_BWD_IMPLS = ("triton", "fused", "gluon")
_TRITON = ("triton",)
_FWD_TILES = "block_m query rows per program, block_n keys per step"

_RECORDS = (
    # The forward's configs choose between two modules (Triton and Gluon), so it hashes both,
    # the schedule the Gluon one walks, and its form on owned steps with their plan
    # (kernels/fwd_halves.py, kernels/halves_plan.py). Its block_n reaches 128, which only the
    # Gluon kernel can use (it pairs 64-key blocks in one tile).
    KernelRecord("fwd", "the forward in Triton, or warp-specialised Gluon on Hopper",
                 ("kernels.fwd", "kernels.fwd_tile", "kernels.common", "kernels.fwd_ws",
                  "kernels.schedule", "kernels.fwd_halves", "kernels.halves_plan"),
                 _FWD_IMPLS, "sparse_attention", "config", True, _FWD_TILES,
                 _space(_FWD_IMPLS, block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8),
                        num_stages=(2, 3, 4))),
    # The backward's two kernels live in one module and have different best tiles. The dk/dv
    # kernel's "fused" implementation (kernels/bwd_fused.py, its pre-pass and launcher) runs the
    # same kernel with dq accumulated in it, and no dq kernel: never the default until measured.
    # Its "gluon" one (kernels/bwd_dkdv_ws.py) uses the Gluon forward's copies and schedule.
    KernelRecord("bwd", "the backward's dk/dv kernel; impl fused takes dq too, impl gluon is "
                 "warp-specialised Gluon on Hopper",
                 ("kernels.bwd", "kernels.common", "kernels.bwd_fused", "kernels.columns",
                  "kernels.bwd_dkdv_ws", "kernels.fwd_ws", "kernels.schedule"), _BWD_IMPLS,
                 "sparse_attention", "bwd_config", True,
                 "block_m kv rows per program (within one sparse block), block_n query rows per "
                 "step; impl fused also accumulates dq (fp32 atomics), and the dq config is "
                 "unused; impl gluon: 64 kv rows, 64 query rows a step, 2 or 3 stages",
                 _space(_BWD_IMPLS, block_m=(32, 64), block_n=(32, 64), num_warps=(4, 8),
                        num_stages=(1, 2, 3))),
    # The dq kernel in Triton, or warp-specialised Gluon on Hopper (kernels/bwd_dq_ws.py, on
    # the Gluon forward's work items, stages and masks: it hashes their modules too), and its
    # form on owned steps (kernels/bwd_dq_halves.py, with the forward's owned-step helpers).
    KernelRecord("dq", "the backward's dq kernel in Triton, or warp-specialised Gluon on Hopper",
                 ("kernels.bwd", "kernels.common", "kernels.bwd_dq_ws", "kernels.fwd_ws",
                  "kernels.schedule", "kernels.ws_mma", "kernels.bwd_dq_halves",
                  "kernels.fwd_halves", "kernels.halves_plan"), _FWD_IMPLS,
                 "sparse_attention", "dq_config", True, _FWD_TILES,
                 _space(_FWD_IMPLS, block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8),
                        num_stages=(2, 3, 4))),
    # The forward's tile loop over each sequence of a packed or padded batch (sparse_attention_
    # padded takes the same configs); Triton only.
    KernelRecord("varlen", "the forward over packed or left-padded sequences (chunked prefill)",
                 ("kernels.varlen", "kernels.fwd_tile", "kernels.common"), _TRITON,
                 "sparse_attention_varlen", "config", True, _FWD_TILES,
                 _space(_TRITON, block_m=(64, 128), block_n=(32, 64), num_warps=(4, 8),
                        num_stages=(2, 3, 4))),
    # One program per (split, batch x kv head) reads the GQA group's query heads as one tile
    # (their count, padded): block_m is not a tile of this kernel and is always 16. Its split
    # count is chosen per call (or pinned by num_splits), not by the config.
    KernelRecord("decode", "decoding, one new token per sequence against its KV cache",
                 ("kernels.decode", "kernels.common"), _TRITON,
                 "sparse_attention_decode", "config", True,
                 "block_n cached keys per step; block_m is always 16 (the query-head tile is the "
                 "GQA group, padded)",
                 _space(_TRITON, block_m=(16,), block_n=(32, 64, 128), num_warps=(2, 4, 8),
                        num_stages=(1, 2, 3))),
    # The forward on float8 e4m3 inputs: a Triton kernel (kernels/fp8.py: the forward's tile
    # plan, masks and normalisation around its own tile loop) and a warp-specialised Gluon one
    # on Hopper (kernels/fp8_ws.py, on the Gluon forward's work items); their rules are
    # kernels.fp8.fp8_config_problems and fp8_default_config. An fp8 case tunes it in the modes
    # with a forward (its backward is not tuned).
    KernelRecord("fp8", "the forward on float8 e4m3 q, k, v with descales, bf16 out",
                 ("kernels.fp8", "kernels.fp8_softmax", "kernels.fp8_ws", "kernels.fwd_ws",
                  "kernels.fwd_tile", "kernels.common", "kernels.schedule", "kernels.ws_mma"),
                 _FWD_IMPLS,
                 "sparse_attention_fp8", "config", True,
                 "block_m query rows per program, block_n keys per step (a multiple of the sparse "
                 "block gathers that many kept blocks into one step); impl gluon: 128 rows, 64 or "
                 "128 keys a step, 4 warps a consumer group",
                 _space(_FWD_IMPLS, block_m=(64, 128), block_n=(64, 128), num_warps=(4, 8),
                        num_stages=(2, 3, 4))),
)

KERNELS: dict[str, KernelRecord] = {record.name: record for record in _RECORDS}

# Implementations of a kernel, every record's in registry order: "triton" everywhere; "gluon", the
# warp-specialised Gluon kernels (kernels/fwd_ws.py, kernels/fp8_ws.py, kernels/bwd_dq_ws.py,
# kernels/bwd_dkdv_ws.py), on Hopper only; "fused", the backward's dk/dv kernel taking dq too (kernels/bwd_fused.py).
IMPLS: tuple[str, ...] = tuple(dict.fromkeys(impl for record in _RECORDS for impl in record.impls))

# The tunable kernels reached through ``sparse_attention``, in registry order: what
# `dkbench tune` tunes today. varlen and decode are tunable too (``KernelRecord.tunable``),
# through their own entry functions.
TUNABLE: tuple[str, ...] = tuple(name for name, record in KERNELS.items()
                                 if record.tunable and record.entry == "sparse_attention")
