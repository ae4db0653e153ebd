"""Launch configs: the config type, its validity rules and defaults per kernel, device and shape.

Every name of the registry (:data:`kernels.KERNELS`) is a ``kernel`` here. The lookup order at
launch is: an explicit config, then the user's tuned cache, then the configs shipped for GPUs we
have tuned on, then the defaults below (see :func:`kernels.select.resolve_config`). Which
implementation a config runs is :func:`kernels.dispatch.choose_impl`'s to say.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import bwd_dkdv_ws, bwd_dq_ws
from .dispatch import choose_impl, gluon_unavailable
from .registry import IMPLS, KERNELS

__all__ = ["DECODE_BLOCK_M", "GLUON_BWD_DEFAULT", "GLUON_DEFAULT", "GLUON_DQ_DEFAULT", "IMPLS",
           "MAX_STAGES", "LaunchConfig", "check_config", "config_problems", "default_config",
           "gluon_default_applies", "gluon_unavailable"]

# Kernels whose config rules live beside their own code, which imports this module (the fp8
# forward's, in kernels/fp8.py): name -> (problems(config, block_size, head_dim),
# default(device, block_size, head_dim, allow_gluon)). kernels/fp8_rules.py registers them when
# the package is imported, so that config_problems and default_config answer for every kernel.
_OWN_RULES: dict[str, tuple[Callable[..., list[str]], Callable[..., "LaunchConfig"]]] = {}


def register_rules(kernel: str, problems: Callable[..., list[str]],
                   default: Callable[..., "LaunchConfig"]) -> None:
    """Make :func:`config_problems` and :func:`default_config` answer for ``kernel`` with
    ``problems`` and ``default``."""
    _OWN_RULES[kernel] = (problems, default)


# A decode config's block_m: the kernel's query tile is the GQA group's heads, padded to a power
# of two of at least 16 per call, so block_m sets nothing and takes this one value.
DECODE_BLOCK_M = 16


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters for one kernel, and which implementation runs it.

    ``block_m`` is the outer tile and ``block_n`` the inner one, per kernel (its record's
    ``config_meaning``): the forward, varlen and dq kernels take ``block_m`` query rows per
    program and ``block_n`` keys per step; the dk/dv kernel ``block_m`` kv rows and ``block_n``
    query rows; decoding ``block_n`` cached keys per step, with ``block_m`` always
    :data:`DECODE_BLOCK_M` (its split count is chosen per call, not here). ``num_warps`` and
    ``num_stages`` are Triton's.

    For ``impl="gluon"``: ``block_m`` is the query tile (128: two 64-row consumer warp groups),
    ``block_n`` the kv tile (64 or 128 keys, gathered from 64-key copies, so two kept blocks of
    64 share one tile), ``num_warps`` the warps of each consumer group (4) and ``num_stages`` the
    kv tiles in flight.

    For ``impl="fused"`` (the dk/dv kernel's, "bwd", only): the tiles of its Triton one, the same
    kernel that then also accumulates dq (:mod:`kernels.bwd_fused`); no dq kernel runs, so the
    call's dq config is unused.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    impl: str = "triton"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LaunchConfig":
        # Entries written before configs named their implementation are Triton ones.
        return cls(int(d["block_m"]), int(d["block_n"]), int(d["num_warps"]), int(d["num_stages"]),
                   str(d.get("impl", "triton")))

    def short(self) -> str:
        prefix = "" if self.impl == "triton" else f"{self.impl}-"
        return f"{prefix}m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}"


def _pow2(x: int) -> bool:
    return x > 0 and not x & (x - 1)


# What a field of any kernel's config must be, whatever the case (the rules per kernel and per
# case below add to these).
WARP_COUNTS = (1, 2, 4, 8, 16)
# The deepest software pipeline a config may ask for. A stage holds a K and a V tile in shared
# memory (32 KiB at 64 keys, head_dim 128, bf16: a Hopper program's 227 KiB holds 6 beside the
# query tile), the Gluon kernels take 2 to 4 and every search space stops at 4; past 8 a value is
# a typo that could only fail to fit at launch, not a config worth trying.
MAX_STAGES = 8


def tile_ok(side: int) -> bool:
    """A tile side (``block_m``, ``block_n``) some kernel can take: a power of two >= 16."""
    return side >= 16 and _pow2(side)


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; the kernels are {', '.join(KERNELS)}")


def config_problems(config: LaunchConfig, block_size: int, head_dim: int,
                    kernel: str = "fwd") -> list[str]:
    """Why a config cannot run this kernel for this sparse block size and head_dim (empty if ok).
    A kernel with rules of its own (:func:`register_rules`: the fp8 forward's) answers by them."""
    _check_kernel(kernel)
    if kernel in _OWN_RULES:
        return _OWN_RULES[kernel][0](config, block_size, head_dim)
    if config.impl not in IMPLS:
        return [f"impl={config.impl!r} must be one of {', '.join(IMPLS)}"]
    if config.impl == "gluon":
        return _gluon_problems(config, block_size, head_dim, kernel)
    if config.impl == "fused" and "fused" not in KERNELS[kernel].impls:
        return [("impl='fused' is the backward's dk/dv kernel only (it takes dq too: no dq "
                 "kernel runs)")]
    # impl "fused" runs the Triton dk/dv kernel with dq added in: its tile rules are these.
    problems = []
    if kernel == "bwd" and config.block_m > block_size:
        # The dk/dv kernel's kv tile (block_m) must stay inside one sparse block.
        problems.append(f"block_m={config.block_m} must not exceed the sparse block size "
                        f"{block_size} for the backward's dk/dv kernel")
    if kernel == "decode":
        if config.block_m != DECODE_BLOCK_M:
            problems.append(f"block_m={config.block_m} must be {DECODE_BLOCK_M} for decoding (its "
                            "query tile is the GQA group's heads, not a config's)")
    else:
        problems += query_tile_problems(config, block_size)
    if not tile_ok(config.block_n):
        problems.append(f"block_n={config.block_n} must be a power of two >= 16")
    elif config.block_n > block_size:
        problems.append(f"block_n={config.block_n} must not exceed the sparse block size {block_size}")
    return problems + launch_problems(config, head_dim)


def query_tile_problems(config: LaunchConfig, block_size: int) -> list[str]:
    """The query tile's rules in a Triton kernel: ``block_m`` a power of two >= 16, spanning at
    most 32 sparse blocks (a tile's row bits are one int32 per block)."""
    if not tile_ok(config.block_m):
        return [f"block_m={config.block_m} must be a power of two >= 16"]
    if config.block_m > block_size and config.block_m // block_size > 32:
        return [f"block_m={config.block_m} spans more than 32 sparse blocks of {block_size}"]
    return []


def launch_problems(config: LaunchConfig, head_dim: int) -> list[str]:
    """The rules every Triton kernel's launch shares: its warps, its stages, the head_dim."""
    problems = []
    if config.num_warps not in WARP_COUNTS:
        problems.append(f"num_warps={config.num_warps} must be one of "
                        f"{', '.join(map(str, WARP_COUNTS))}")
    if not 1 <= config.num_stages <= MAX_STAGES:
        problems.append(f"num_stages={config.num_stages} must be 1 to {MAX_STAGES}")
    if head_dim > 256:
        problems.append(f"head_dim={head_dim} is above 256")
    return problems


def _gluon_problems(config: LaunchConfig, block_size: int, head_dim: int,
                    kernel: str) -> list[str]:
    """The Gluon kernels' rules: the forward's and dq's 128-row query tile with 64- or 128-key
    steps, 2 to 4 stages; the dk/dv kernel's 64-key kv tile with 64-row query steps, 2 or 3
    stages; 4 warps a consumer group, 64-key sparse blocks or multiples, head_dim 64 or 128."""
    problems = []
    if "gluon" not in KERNELS[kernel].impls:
        gluon_kernels = ", ".join(name for name, record in KERNELS.items()
                                  if "gluon" in record.impls)
        problems.append(f"impl='gluon' runs the {gluon_kernels} kernels only")
    if kernel == "bwd":
        tiles, stages = {"block_m": (64,), "block_n": (64,)}, bwd_dkdv_ws.STAGE_CHOICES
    else:
        tiles, stages = {"block_m": (128,), "block_n": (64, 128)}, (2, 3, 4)
    for axis, allowed in tiles.items():
        value = getattr(config, axis)
        if value not in allowed:
            problems.append(f"{axis}={value} must be {' or '.join(map(str, allowed))} for "
                            f"impl='gluon'")
    if config.num_warps != 4:
        problems.append(f"num_warps={config.num_warps} must be 4 for impl='gluon' "
                        "(warps per consumer group)")
    if config.num_stages not in stages:
        problems.append(f"num_stages={config.num_stages} must be "
                        f"{', '.join(map(str, stages[:-1]))} or {stages[-1]} for impl='gluon'")
    if block_size % 64:
        problems.append(f"impl='gluon' needs a sparse block size that is a multiple of 64, "
                        f"got {block_size}")
    if head_dim not in (64, 128):
        problems.append(f"impl='gluon' needs head_dim 64 or 128, got {head_dim}")
    elif not problems:
        problems += _gluon_shared_memory(config, head_dim, kernel)
    return problems


def _gluon_shared_memory(config: LaunchConfig, head_dim: int, kernel: str) -> list[str]:
    """Whether the backward's Gluon kernels fit a Hopper program's shared memory (the
    forward's every config does)."""
    if kernel == "dq":
        need = bwd_dq_ws.shared_bytes(head_dim, config.block_n, config.num_stages)
    elif kernel == "bwd":
        need = bwd_dkdv_ws.shared_bytes(head_dim, config.num_stages)
    else:
        return []
    if need <= bwd_dq_ws.SHARED_LIMIT:
        return []
    return [f"the Gluon {kernel} kernel at {config.short()} and head_dim {head_dim} needs {need} "
            f"bytes of shared memory, over a Hopper program's {bwd_dq_ws.SHARED_LIMIT}"]


def check_config(config: LaunchConfig, block_size: int, head_dim: int, kernel: str = "fwd") -> None:
    problems = config_problems(config, block_size, head_dim, kernel)
    if problems:
        raise ValueError("invalid launch config " + config.short() + ": " + "; ".join(problems))


# Measured fastest on the H100 for the phi-3 shapes, 8k to 64k (kernels/PERF.md).
GLUON_DEFAULT = LaunchConfig(128, 128, 4, 3, "gluon")
# The Gluon dq kernel's: 64-key steps, four in flight; on the H200 the backward with it took
# 0.90-0.96 of its time with the Triton dq kernel at phi-3's shapes, 128-key steps 1.16-1.18
# (they spill) (kernels/PERF.md).
GLUON_DQ_DEFAULT = LaunchConfig(128, 64, 4, 4, "gluon")
# The Gluon dk/dv kernel's (its one tile shape, two stages): on the H200 the backward with it
# took 0.85-0.99 of its time with the Triton dk/dv kernel (kernels/PERF.md).
GLUON_BWD_DEFAULT = LaunchConfig(64, 64, 4, 2, "gluon")
_GLUON_DEFAULTS = {"fwd": GLUON_DEFAULT, "dq": GLUON_DQ_DEFAULT, "bwd": GLUON_BWD_DEFAULT}


def gluon_default_applies(device: torch.device, block_size: int, head_dim: int,
                          dtype: torch.dtype, kernel: str = "fwd") -> bool:
    """Whether ``kernel`` (the forward, dq or dk/dv) defaults to its Gluon kernel here: the
    dispatcher would run it on this device and dtype (Hopper, 16-bit), and the shape fits its
    default (:data:`GLUON_DEFAULT`, :data:`GLUON_DQ_DEFAULT`, :data:`GLUON_BWD_DEFAULT`)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return (choose_impl(kernel, "gluon", device, dtype).impl == "gluon"
            and not _gluon_problems(_GLUON_DEFAULTS[kernel], block_size, head_dim, kernel))


def default_config(kernel: str, device: torch.device, block_size: int, head_dim: int,
                   dtype: torch.dtype, allow_gluon: bool = True) -> LaunchConfig:
    """A config of ``kernel`` that runs everywhere and is reasonable on recent GPUs
    (``allow_gluon=False``: a Triton one even where a Gluon kernel would be the default). A
    kernel with rules of its own (:func:`register_rules`) takes its own default."""
    _check_kernel(kernel)
    if kernel in _OWN_RULES:
        return _OWN_RULES[kernel][1](device, block_size, head_dim, allow_gluon)
    if kernel == "decode":
        # 64-key steps at 4 warps, and Triton's default 3 stages on a GPU: what decoding
        # launched with before it took configs.
        stages = 3 if device.type == "cuda" else 1
        return LaunchConfig(DECODE_BLOCK_M, min(block_size, 64), 4, stages)
    if device.type != "cuda":
        # Interpreter: small tiles keep numpy's temporaries small; stages mean nothing there.
        tile = min(32, block_size)
        return LaunchConfig(tile, tile, 4, 1)
    # From the phi-3 scan (kernels/PERF.md): 4 warps beat 8 on Hopper, 2 stages beat 3 for
    # 128-row tiles; wide head dims and fp32 take smaller tiles to fit registers.
    big = head_dim > 128 or dtype == torch.float32
    if kernel == "fwd" and allow_gluon and gluon_default_applies(device, block_size, head_dim,
                                                                 dtype):
        return GLUON_DEFAULT
    if kernel in ("fwd", "varlen"):
        # The varlen kernel runs the forward's tile loop: the forward's Triton default.
        block_m = 64 if big else 128
        return LaunchConfig(block_m, min(block_size, 32 if big else 64), 4, 2)
    if kernel == "dq":
        if allow_gluon and gluon_default_applies(device, block_size, head_dim, dtype, "dq"):
            return GLUON_DQ_DEFAULT
        # 32-key steps: on the H100 the dq kernel ran 10% faster than with 64 (PERF.md).
        return LaunchConfig(min(block_size, 64), min(block_size, 32), 4, 2)
    if (kernel == "bwd" and allow_gluon
            and gluon_default_applies(device, block_size, head_dim, dtype, "bwd")):
        return GLUON_BWD_DEFAULT
    return LaunchConfig(min(block_size, 64), min(block_size, 32 if big else 64), 4, 2)
