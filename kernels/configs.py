"""Launch configs: the config type, its validity rules, and defaults per device and shape.

The lookup order at launch is: an explicit config, then the user's tuned cache, then the configs
shipped for GPUs we have tuned on, then the defaults below (see :func:`select_config`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

KERNELS = ("fwd", "bwd")


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters for one kernel."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LaunchConfig":
        return cls(int(d["block_m"]), int(d["block_n"]), int(d["num_warps"]), int(d["num_stages"]))

    def short(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}"


def _pow2(x: int) -> bool:
    return x > 0 and not x & (x - 1)


def config_problems(config: LaunchConfig, block_size: int, head_dim: int,
                    kernel: str = "fwd") -> list[str]:
    """Why a config cannot run this kernel for this sparse block size and head_dim (empty if ok)."""
    problems = []
    if kernel == "bwd" and config.block_m > block_size:
        # The dk/dv kernel's kv tile (block_m) must stay inside one sparse block.
        problems.append(f"block_m={config.block_m} must not exceed the sparse block size "
                        f"{block_size} for the backward")
    if not (_pow2(config.block_m) and config.block_m >= 16):
        problems.append(f"block_m={config.block_m} must be a power of two >= 16")
    elif config.block_m > block_size and config.block_m // block_size > 32:
        problems.append(f"block_m={config.block_m} spans more than 32 sparse blocks of {block_size}")
    if not (_pow2(config.block_n) and config.block_n >= 16):
        problems.append(f"block_n={config.block_n} must be a power of two >= 16")
    elif config.block_n > block_size:
        problems.append(f"block_n={config.block_n} must not exceed the sparse block size {block_size}")
    if config.num_warps not in (1, 2, 4, 8, 16):
        problems.append(f"num_warps={config.num_warps} must be one of 1, 2, 4, 8, 16")
    if config.num_stages < 1:
        problems.append(f"num_stages={config.num_stages} must be >= 1")
    if head_dim > 256:
        problems.append(f"head_dim={head_dim} is above 256")
    return problems


def check_config(config: LaunchConfig, block_size: int, head_dim: int, kernel: str = "fwd") -> None:
    problems = config_problems(config, block_size, head_dim, kernel)
    if problems:
        raise ValueError("invalid launch config " + config.short() + ": " + "; ".join(problems))


def default_config(kernel: str, device: torch.device, block_size: int, head_dim: int,
                   dtype: torch.dtype) -> LaunchConfig:
    """A config that runs everywhere and is reasonable on recent GPUs."""
    if device.type != "cuda":
        # Interpreter: small tiles keep numpy's temporaries small; stages mean nothing there.
        tile = min(32, block_size)
        return LaunchConfig(tile, tile, 4, 1)
    # From the phi-3 scan (kernels/PERF.md): 4 warps beat 8 on Hopper, 2 stages beat 3 for
    # 128-row tiles; wide head dims and fp32 take smaller tiles to fit registers.
    big = head_dim > 128 or dtype == torch.float32
    if kernel == "fwd":
        block_m = 64 if big else 128
        return LaunchConfig(block_m, min(block_size, 32 if big else 64), 4, 2)
    return LaunchConfig(min(block_size, 64), min(block_size, 32 if big else 64), 4, 2)
