"""The config space `dkbench tune` searches per kernel, and the prune rules.

A space is data (``{"block_m": (64, 128), "block_n": (32, 64), ...}``, each kernel's from its
registry record); what cannot run is pruned before anything compiles, each pruned config with the
reason, so `--dry-run` can show both lists without compiling anything.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import triton

from kernels import (
    AXES,
    IMPLS,
    KERNELS,
    MAX_STAGES,
    WARP_COUNTS,
    LaunchConfig,
    config_problems,
    default_config,
    fp8_gluon_unavailable,
    gluon_unavailable,
    tile_ok,
)

from ..errors import BadInputError

# Every kernel `dkbench tune` can tune, in registry order.
TUNED: tuple[str, ...] = tuple(name for name, record in KERNELS.items() if record.tunable)

# Searched when no list is given for an axis: on a GPU each kernel's record's space. The Triton
# kernels' block_n (and the dk/dv kernel's block_m) is capped at the sparse block size (they walk
# whole sparse blocks in tile steps); the forward's Gluon kernel (impl "gluon", Hopper only)
# gathers two 64-key blocks into its 128-wide tiles, so the forward also tries block_n 128, which
# only it can use. In the interpreter only correctness and the pipeline mean anything, so the CPU
# space is tiny; warps and stages do nothing there.
GPU_SPACES: Mapping[str, Mapping[str, tuple]] = MappingProxyType(
    {name: KERNELS[name].search_space for name in TUNED})
CPU_SPACE: Mapping[str, tuple] = MappingProxyType(
    {"block_m": (16, 32), "block_n": (16, 32), "num_warps": (4,), "num_stages": (1,),
     "impl": ("triton",)})


@dataclass(frozen=True)
class Problem:
    """What decides whether a config can run: the kernel, the tile constraints, the device."""

    kernel: str  # a name of kernels.KERNELS
    block_size: int
    head_dim: int
    dtype: torch.dtype
    smem_limit: int | None  # bytes of shared memory per block (opt-in), None on the CPU
    capability: tuple[int, int] | None = None  # CUDA compute capability, None on the CPU
    device: torch.device | None = None  # where it runs (the fp8 kernel's rules ask the device)


@dataclass(frozen=True)
class Space:
    """A cartesian product of values per axis (tuples: never mutated)."""

    kernel: str
    values: Mapping[str, tuple] = field(hash=False)

    def configs(self) -> list[LaunchConfig]:
        """Every combination, in axis order (block_m slowest, impl fastest)."""
        axes = (self.values[a] for a in AXES)
        return [LaunchConfig(*combo) for combo in itertools.product(*axes)]

    def as_dict(self) -> dict[str, list]:
        return {a: list(self.values[a]) for a in AXES}


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """``"32,64,128"`` -> ``(32, 64, 128)``; BadInputError naming the flag on anything else."""
    if not text.replace(",", "").strip():
        raise BadInputError(f"{flag} {text!r}: expected at least one integer")
    values = []
    for part in text.split(","):
        part = part.strip()
        # [0-9], not int()'s leniency: "1_6" or a full-width "１６" is no value a user means.
        if not re.fullmatch(r"-?[0-9]+", part):
            what = f"{part!r} is not an integer" if part else "an empty item between commas"
            raise BadInputError(f"{flag} {text!r}: {what}; expected comma-separated integers "
                                "(e.g. 32,64)")
        value = int(part)
        if value < 1:
            raise BadInputError(f"{flag} {text!r}: values must be positive, got {value}")
        values.append(value)
    return tuple(dict.fromkeys(values))


# What a value of each integer axis must be for any kernel, any case, any device (the kernels'
# `config_problems`): a value outside it could only be pruned everywhere, so it is refused as the
# bad input it is. Limits per case (block_n within the sparse block, shared memory) stay prune
# rules, with their reasons in --dry-run.
AXIS_RULES: Mapping[str, tuple[Callable[[int], bool], str]] = MappingProxyType({
    "block_m": (tile_ok, "powers of two from 16 (16, 32, 64, 128, ...)"),
    "block_n": (tile_ok, "powers of two from 16 (16, 32, 64, 128, ...)"),
    "num_warps": (lambda v: v in WARP_COUNTS, ", ".join(map(str, WARP_COUNTS))),
    "num_stages": (lambda v: 1 <= v <= MAX_STAGES, f"integers 1 to {MAX_STAGES}"),
})


def parse_axis(axis: str, text: str) -> tuple[int, ...]:
    """``--block-m 32,64`` and the like: :func:`parse_int_list`, then each value against the
    axis's :data:`AXIS_RULES`; BadInputError naming the flag, the value and what is allowed."""
    flag = "--" + axis.replace("_", "-")
    values = parse_int_list(text, flag)
    ok, allowed = AXIS_RULES[axis]
    bad = [v for v in values if not ok(v)]
    if bad:
        raise BadInputError(f"{flag} {text!r}: {bad[0]} cannot be a {axis} of any kernel; "
                            f"allowed: {allowed}")
    return values


def parse_impl_list(text: str, flag: str = "--impl") -> tuple[str, ...]:
    """``"triton,gluon"`` -> ``("triton", "gluon")``; BadInputError naming the allowed values."""
    parts = [p.strip() for p in text.split(",")]
    if "" in parts or any(p not in IMPLS for p in parts):
        empty = "an empty item between commas; " if "" in parts and text.strip(", ") else ""
        raise BadInputError(f"{flag} {text!r}: {empty}allowed values are {', '.join(IMPLS)}, "
                            "comma-separated")
    return tuple(dict.fromkeys(parts))


def default_space(kernel: str, device: torch.device, block_size: int) -> dict[str, tuple]:
    base = GPU_SPACES[kernel]
    if device.type != "cuda":
        # An axis the kernel fixes (one value: decoding's block_m) keeps it on the CPU too.
        base = {a: base[a] if len(base[a]) == 1 else CPU_SPACE[a] for a in AXES}
    values = dict(base)
    # The dk/dv kernel's outer tile (block_m) must stay inside one sparse block, like block_n. The
    # forward's and dq's block_n may reach 128 where their Gluon kernels can pair 64-key blocks;
    # the prune rules drop the Triton configs past the block size.
    # The fp8 forward's steps gather kept blocks too, in both of its implementations.
    cap = block_size
    if kernel in ("fwd", "dq", "fp8") and "gluon" in base["impl"] and block_size % 64 == 0:
        cap = max(block_size, 128)
    for axis in ("block_n", "block_m") if kernel == "bwd" else ("block_n",):
        values[axis] = tuple(dict.fromkeys(min(n, cap) for n in base[axis]))
    return values


def build_space(kernel: str, device: torch.device, block_size: int,
                overrides: Mapping[str, tuple | None]) -> Space:
    """The default space of ``kernel`` on ``device`` with the axes given on the command line."""
    values = default_space(kernel, device, block_size)
    for axis, given in overrides.items():
        if given:
            values[axis] = tuple(given)
    return Space(kernel, MappingProxyType(values))


# -- prune rules: each returns why a config cannot run, or None ---------------------------------


def shared_memory_bytes(config: LaunchConfig, problem: Problem) -> int:
    """A lower estimate of the shared memory a config needs (bytes).

    Every kernel pipelines two ``block_n x head_dim`` tiles over ``num_stages`` buffers and keeps
    its outer ``block_m`` tile resident: forward (and varlen, and decoding's query heads), K and V
    streamed past Q; backward, Q and dO streamed past K and V for dk/dv ("bwd"), and K and V past
    Q and dO for dq, so two resident tiles.
    """
    dim = max(16, triton.next_power_of_2(problem.head_dim))
    elem = torch.tensor([], dtype=problem.dtype).element_size()
    resident = 2 if problem.kernel in ("bwd", "dq") else 1
    return (config.num_stages * config.block_n * dim * 2 + resident * config.block_m * dim) * elem


def fits_sparse_block(config: LaunchConfig, problem: Problem) -> str | None:
    problems = config_problems(config, problem.block_size, problem.head_dim, problem.kernel)
    return "; ".join(problems) if problems else None


def fits_shared_memory(config: LaunchConfig, problem: Problem) -> str | None:
    if problem.smem_limit is None:
        return None  # the interpreter has no shared memory
    need = shared_memory_bytes(config, problem)
    if need > problem.smem_limit:
        return (f"needs ~{need // 1024} KiB of shared memory, the device has "
                f"{problem.smem_limit // 1024} KiB")
    return None


def runs_on_device(config: LaunchConfig, problem: Problem) -> str | None:
    """The Gluon kernels need Hopper, 16-bit inputs (the fp8 forward's, e4m3 ones) and a triton
    that has Gluon."""
    if config.impl != "gluon":
        return None
    if problem.kernel == "fp8":
        return fp8_gluon_unavailable(problem.device or torch.device("cpu"))
    return gluon_unavailable(problem.capability, problem.dtype)


def kernel_accepts(config: LaunchConfig, problem: Problem) -> str | None:
    """The kernels' compile-time asserts on tile shapes (``tl.static_assert``), as a rule here so
    that a bad combination is pruned with a reason instead of failing to compile."""
    if config.impl == "gluon" or problem.kernel == "fp8":
        return None  # config_problems (fp8_config_problems) holds all of its tile rules
    bs = problem.block_size
    if bs % config.block_n:
        return f"the kernel needs block_n={config.block_n} to divide the block size {bs}"
    if bs % config.block_m and config.block_m % bs:
        return f"the kernel needs block_m={config.block_m} to divide or be a multiple of {bs}"
    return None


PRUNE_RULES: tuple[Callable[[LaunchConfig, Problem], str | None], ...] = (
    fits_sparse_block, runs_on_device, fits_shared_memory, kernel_accepts)


def prune_reason(config: LaunchConfig, problem: Problem) -> str | None:
    """The first rule that rejects ``config``, or None when it may run."""
    for rule in PRUNE_RULES:
        reason = rule(config, problem)
        if reason:
            return reason
    return None


def smem_limit(device: torch.device) -> int | None:
    """Shared memory per block a kernel may opt in to; None on the CPU or when torch cannot say."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    return int(limit) if limit else None


@dataclass(frozen=True)
class Candidates:
    """What one (case, kernel) tune measures and what it skips."""

    kernel: str
    default: LaunchConfig
    run: tuple[LaunchConfig, ...]  # the default first: it is always timed, as the reference
    pruned: tuple[tuple[LaunchConfig, str], ...]


def plan_candidates(space: Space, problem: Problem, device: torch.device) -> Candidates:
    """Split the space into configs to measure and pruned ones; the default is always measured."""
    default = default_config(problem.kernel, device, problem.block_size, problem.head_dim,
                             problem.dtype)
    run, pruned = [default], []
    for config in space.configs():
        if config == default:
            continue
        reason = prune_reason(config, problem)
        if reason:
            pruned.append((config, reason))
        else:
            run.append(config)
    return Candidates(problem.kernel, default, tuple(run), tuple(pruned))
