"""What `dkbench tune` measures: the cases, and per kernel a config space with prune rules.

A space is data (``{"block_m": (64, 128), "block_n": (32, 64), ...}``); what cannot run is pruned
before anything compiles, each pruned config with the reason, so `--dry-run` can show both lists
without compiling anything.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
import triton
from pydantic import ValidationError

from kernels import KERNELS, BlockLayout
from kernels.configs import (
    IMPLS,
    LaunchConfig,
    config_problems,
    default_config,
    gluon_unavailable,
)
from kernels.registry import TUNABLE

from ..errors import BadInputError
from ..spec.load import check_sweep
from ..spec.sweep import Case, Sweep, expand

AXES = ("block_m", "block_n", "num_warps", "num_stages", "impl")
# The registry's tunable kernels, tuned in its order, each behind the winners before it: the
# forward, then the backward's dk/dv kernel ("bwd") with the dq kernel's looked-up config, then
# the dq kernel ("dq") behind the dk/dv winner. The backward modes tune all but the forward.
MODE_KERNELS = {"fwd": ("fwd",), "bwd": tuple(k for k in TUNABLE if k != "fwd"),
                "fwd_bwd": TUNABLE}

# The shape tuned when no SPEC is given: phi-3-small's attention on a GPU; a tiny one on the CPU,
# where every kernel call goes through Triton's interpreter.
GPU_SHAPE = {"seqlen": 8192, "heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bf16",
             "batch": 1, "block_size": 64, "local_blocks": 16, "vert_stride": 8}
CPU_SHAPE = {"seqlen": 256, "heads": 2, "kv_heads": 1, "head_dim": 32, "dtype": "fp32",
             "batch": 1, "block_size": 32, "local_blocks": 2, "vert_stride": 2}

# Searched when no list is given for an axis. The Triton kernels' block_n (and the dk/dv
# kernel's block_m) is capped at the sparse block size (they walk whole sparse blocks in tile
# steps); the forward's Gluon kernel (impl "gluon", Hopper only) gathers two 64-key blocks into
# its 128-wide tiles, so the forward also tries block_n 128, which only it can use. In the interpreter only
# correctness and the pipeline mean anything, so the CPU space is tiny; warps and stages do
# nothing there. Each tunable kernel's implementations are its record's.
_GPU_TILES = {
    "fwd": {"block_m": (64, 128), "block_n": (32, 64, 128), "num_warps": (4, 8),
            "num_stages": (2, 3, 4)},
    "bwd": {"block_m": (32, 64), "block_n": (32, 64), "num_warps": (4, 8),
            "num_stages": (1, 2, 3)},
    "dq": {"block_m": (64, 128), "block_n": (32, 64), "num_warps": (4, 8),
           "num_stages": (2, 3, 4)},
}
GPU_SPACES: Mapping[str, Mapping[str, tuple]] = MappingProxyType({
    name: MappingProxyType({**_GPU_TILES[name], "impl": KERNELS[name].impls})
    for name in TUNABLE})
CPU_SPACE: Mapping[str, tuple] = MappingProxyType(
    {"block_m": (16, 32), "block_n": (16, 32), "num_warps": (4,), "num_stages": (1,),
     "impl": ("triton",)})


@dataclass(frozen=True)
class Problem:
    """What decides whether a config can run: the kernel, the tile constraints, the device."""

    kernel: str  # "fwd", "bwd" (the dk/dv kernel) or "dq"
    block_size: int
    head_dim: int
    dtype: torch.dtype
    smem_limit: int | None  # bytes of shared memory per block (opt-in), None on the CPU
    capability: tuple[int, int] | None = None  # CUDA compute capability, None on the CPU


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
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise BadInputError(f"{flag} {text!r}: expected comma-separated integers") from None
        if value < 1:
            raise BadInputError(f"{flag} {text!r}: values must be positive, got {value}")
        values.append(value)
    if not values:
        raise BadInputError(f"{flag} {text!r}: expected at least one integer")
    return tuple(dict.fromkeys(values))


def parse_impl_list(text: str, flag: str = "--impl") -> tuple[str, ...]:
    """``"triton,gluon"`` -> ``("triton", "gluon")``; BadInputError naming the allowed values."""
    values = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [v for v in values if v not in IMPLS]
    if bad or not values:
        raise BadInputError(f"{flag} {text!r}: allowed values are {', '.join(IMPLS)}")
    return values


def default_space(kernel: str, device: torch.device, block_size: int) -> dict[str, tuple]:
    base = GPU_SPACES[kernel] if device.type == "cuda" else CPU_SPACE
    values = dict(base)
    # The dk/dv kernel's outer tile (block_m) must stay inside one sparse block, like block_n. The
    # forward's block_n may reach 128 where the Gluon kernel can pair 64-key blocks; the prune
    # rules drop the Triton configs past the block size.
    cap = block_size
    if kernel == "fwd" and "gluon" in base["impl"] and block_size % 64 == 0:
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
    its outer ``block_m`` tile resident: forward, K and V streamed past Q; backward, Q and dO
    streamed past K and V for dk/dv ("bwd"), and K and V past Q and dO for dq, so two resident
    tiles.
    """
    dim = max(16, triton.next_power_of_2(problem.head_dim))
    elem = torch.tensor([], dtype=problem.dtype).element_size()
    resident = 1 if problem.kernel == "fwd" else 2
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
    """The Gluon forward needs Hopper, 16-bit inputs and a triton that has Gluon."""
    if config.impl != "gluon":
        return None
    return gluon_unavailable(problem.capability, problem.dtype)


def kernel_accepts(config: LaunchConfig, problem: Problem) -> str | None:
    """The kernels' compile-time asserts on tile shapes (``tl.static_assert``), as a rule here so
    that a bad combination is pruned with a reason instead of failing to compile."""
    if config.impl == "gluon":
        return None  # config_problems holds all of its tile rules
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


# -- what to tune ----------------------------------------------------------------------------------


def shape_defaults(device: torch.device) -> dict:
    return dict(GPU_SHAPE if device.type == "cuda" else CPU_SHAPE)


def sweep_from_flags(device: torch.device, mode: str, **given: int | str | None) -> Sweep:
    """A one-case sweep of the bundled kernel on a local-stride pattern (head_sliding_offset 1).

    ``given`` holds the shape flags (None: the default of :data:`GPU_SHAPE`/:data:`CPU_SHAPE`).
    """
    unknown = sorted(set(given) - set(GPU_SHAPE))
    if unknown:
        raise TypeError(f"unknown shape flags {unknown}")
    shape = shape_defaults(device)
    shape.update({k: v for k, v in given.items() if v is not None})
    name = f"flags-s{shape['seqlen']}-h{shape['heads']}-d{shape['head_dim']}"
    raw = {"name": name, "device": device.type, "mode": mode, "dtype": shape["dtype"],
           "batch": shape["batch"], "seqlen": shape["seqlen"], "heads": shape["heads"],
           "kv_heads": shape["kv_heads"], "head_dim": shape["head_dim"], "causal": True,
           "patterns": [{"type": "local_stride", "block_size": shape["block_size"],
                         "local_blocks": shape["local_blocks"],
                         "vert_stride": shape["vert_stride"], "head_sliding_offset": 1}],
           "providers": ["dkbench"]}
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadInputError(f"shape flags: {problems}") from None
    check_sweep(sweep, Path("shape flags"))
    return sweep


def resolve_mode(sweep: Sweep, mode: str | None) -> str:
    """``--mode``, else the spec's mode (several: fwd_bwd when any needs the backward)."""
    if mode is not None:
        if mode not in MODE_KERNELS:
            raise BadInputError(f"--mode {mode!r}: allowed values are {', '.join(MODE_KERNELS)}")
        return mode
    modes = sweep.mode if isinstance(sweep.mode, list) else [sweep.mode]
    # Varlen prefill runs the forward kernel's configs; decoding has no tile config to tune.
    modes = ["fwd" if m == "prefill_varlen" else m for m in modes if m != "decode"]
    if not modes:
        raise BadInputError("the spec's only mode is decode, which has no launch config to tune "
                            "(its split count is chosen per call); give --mode fwd to tune the "
                            "forward kernel on these shapes")
    if len(set(modes)) == 1:
        return modes[0]
    return "fwd_bwd" if any(m != "fwd" for m in modes) else "fwd"


def require_backward() -> None:
    """BadInputError when the backward kernel module is missing (it is being written)."""
    try:
        importlib.import_module("kernels.bwd")
    except ImportError:
        raise BadInputError("the backward kernel is not available yet (kernels.bwd cannot be "
                            "imported); tune with --mode fwd") from None


@dataclass(frozen=True)
class TuneJob:
    """One case to tune: its layout and the candidates of each kernel, in tuning order."""

    case: Case  # mode set to the tune mode; its case_id names the tune.csv rows
    layout: BlockLayout
    candidates: tuple[Candidates, ...]


def plan_tune(sweep: Sweep, mode: str, device: torch.device,
              overrides: Mapping[str, tuple[int, ...] | None]) -> list[TuneJob]:
    """Every case of the sweep (mode replaced by ``mode``, duplicates dropped), its candidates."""
    kernels = MODE_KERNELS[mode]
    if "bwd" in kernels:
        require_backward()
    limit = smem_limit(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    jobs, seen = [], set()
    for case in expand(sweep):
        case = dataclasses.replace(case, mode=mode)
        if case in seen:
            continue
        seen.add(case)
        layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
        dtype = getattr(torch, case.dtype)
        candidates = []
        for kernel in kernels:
            problem = Problem(kernel, case.block_size, case.head_dim, dtype, limit, capability)
            space = build_space(kernel, device, case.block_size, overrides)
            candidates.append(plan_candidates(space, problem, device))
        jobs.append(TuneJob(case, layout, tuple(candidates)))
    return jobs
