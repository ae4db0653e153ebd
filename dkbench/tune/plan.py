"""What `dkbench tune` tunes: the modes, the cases, and per case the candidates of each kernel.

A training case (fwd, bwd, fwd_bwd) is tuned in one training mode for all of them: the forward,
then the backward's dk/dv kernel ("bwd") behind the forward's winner, then its dq kernel behind
both. An fp8 case tunes its forward (kernel "fp8") in a mode with the forward (fwd, fwd_bwd);
its backward runs its default, so a bwd-only tune has nothing of it to tune. An inference case is
tuned in its own mode, on its own lengths: prefill_varlen tunes the varlen kernel, decode the
decoding kernel.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from kernels import KERNELS, TUNABLE, BlockLayout

from ..errors import BadInputError, SpecError
from ..names import BUNDLED_PROVIDER
from ..spec.load import check_sweep
from ..spec.sweep import (
    DTYPES,
    FP8,
    INFERENCE_MODES,
    TRAINING_MODES,
    Case,
    Sweep,
    as_list,
    expand,
)
from .space import Candidates, Problem, build_space, plan_candidates, smem_limit

# The kernels each tune mode tunes, in tuning order, each behind the winners before it. The
# training modes tune the registry's kernels of sparse_attention (the backward modes all but the
# forward); an inference mode tunes the kernel of its own entry function.
_INFERENCE_KERNELS = {"prefill_varlen": "varlen", "decode": "decode"}
MODE_KERNELS: dict[str, tuple[str, ...]] = {
    "fwd": ("fwd",), "bwd": tuple(k for k in TUNABLE if k != "fwd"), "fwd_bwd": TUNABLE,
    **{mode: (k,) for mode, k in _INFERENCE_KERNELS.items() if KERNELS[k].tunable}}

# The shape tuned when no SPEC is given: phi-3-small's attention on a GPU; a tiny one on the CPU,
# where every kernel call goes through Triton's interpreter.
GPU_SHAPE = {"seqlen": 8192, "heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bf16",
             "batch": 1, "block_size": 64, "local_blocks": 16, "vert_stride": 8}
CPU_SHAPE = {"seqlen": 256, "heads": 2, "kv_heads": 1, "head_dim": 32, "dtype": "fp32",
             "batch": 1, "block_size": 32, "local_blocks": 2, "vert_stride": 2}


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
           "providers": [BUNDLED_PROVIDER]}
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_flag_problem(".".join(map(str, e["loc"])), e["msg"], shape, mode)
                             for e in exc.errors())
        raise BadInputError(problems) from None
    try:
        check_sweep(sweep, Path("shape flags"))
    except SpecError as exc:
        key, _, msg = str(exc).removeprefix("shape flags: ").partition(": ")
        raise BadInputError(_flag_problem(key, msg, shape, mode)) from None
    return sweep


# The key paths of the one-case sweep that a shape flag fills, by the flag's name.
_FLAG_KEYS = {"seqlen": ("seqlen",), "heads": ("heads",), "kv_heads": ("kv_heads",),
              "head_dim": ("head_dim",), "dtype": ("dtype",), "batch": ("batch",),
              "block_size": ("patterns[0].block_size", "patterns.0.local_stride.block_size"),
              "local_blocks": ("patterns.0.local_stride.local_blocks",),
              "vert_stride": ("patterns.0.local_stride.vert_stride",), "mode": ("mode",)}


def _flag_problem(key: str, msg: str, shape: dict, mode: str) -> str:
    """``KEY: MSG`` of the one-case sweep as the flag that set it: ``--local-blocks 0: ...``."""
    msg = msg.removeprefix("Value error, ")
    for name, keys in _FLAG_KEYS.items():
        if key in keys:
            value = mode if name == "mode" else shape[name]
            return f"--{name.replace('_', '-')} {value}: {msg}"
    return f"shape flags: {key}: {msg}"


def resolve_modes(sweep: Sweep, mode: str | None) -> tuple[str, ...]:
    """``--mode``, else the spec's modes: its training modes as one (fwd_bwd when they are
    several), then each of its inference modes."""
    if mode is not None:
        if mode not in MODE_KERNELS:
            raise BadInputError(f"--mode {mode!r}: allowed values are {', '.join(MODE_KERNELS)}")
        return (mode,)
    modes = as_list(sweep.mode)
    training = list(dict.fromkeys(m for m in modes if m in TRAINING_MODES))
    tuned = [training[0] if len(training) == 1 else "fwd_bwd"] if training else []
    return (*tuned, *(m for m in INFERENCE_MODES if m in modes and m in MODE_KERNELS))


def tune_mode(case_mode: str, modes: tuple[str, ...]) -> str | None:
    """The mode a case of ``case_mode`` is tuned in: the training mode among ``modes`` for a
    training case, its own for an inference case; None when ``modes`` leaves it out."""
    if case_mode in TRAINING_MODES:
        return next((m for m in modes if m in TRAINING_MODES), None)
    return case_mode if case_mode in modes else None


def check_tunable(sweep: Sweep, where: str) -> None:
    """BadInputError, naming ``where`` (the spec file, or the flags) and the key, for what a tune
    cannot honour: rows timed both ways (a tune picks one config per case, by one timing)."""
    if sweep.timing.graph_rows:
        raise BadInputError(f"{where}: timing.cuda_graph: [false, true] times every row both "
                            "ways, but a tune picks one config per case by one timing; allowed: "
                            "false (eager, interleaved) or true (CUDA-graph replay)")


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


def case_kernels(case: Case, mode: str) -> tuple[str, ...]:
    """The kernels a case tunes in ``mode``: the mode's, or for an fp8 case its forward ("fp8")
    where the mode tunes the forward (its backward is not tuned)."""
    if case.dtype == FP8:
        return ("fp8",) if "fwd" in MODE_KERNELS[mode] else ()
    return MODE_KERNELS[mode]


def plan_tune(sweep: Sweep, modes: tuple[str, ...], device: torch.device,
              overrides: Mapping[str, tuple | None]) -> list[TuneJob]:
    """Every case of the sweep in its tune mode (:func:`tune_mode`; duplicates dropped), with
    its candidates; BadInputError when ``modes`` leaves no case."""
    if any("bwd" in MODE_KERNELS[m] for m in modes) and any(
            DTYPES.get(d, d) != FP8 for d in as_list(sweep.dtype)):
        require_backward()
    limit = smem_limit(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    jobs, seen, fp8_left = [], set(), False
    for case in expand(sweep):
        mode = tune_mode(case.mode, modes)
        if mode is None:
            continue
        case = dataclasses.replace(case, mode=mode)
        if case in seen:
            continue
        seen.add(case)
        kernels = case_kernels(case, mode)
        if not kernels:
            fp8_left = True
            continue
        layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
        dtype = getattr(torch, case.dtype)
        candidates = []
        for kernel in kernels:
            problem = Problem(kernel, case.block_size, case.head_dim, dtype, limit, capability,
                              device)
            space = build_space(kernel, device, case.block_size, overrides)
            candidates.append(plan_candidates(space, problem, device))
        jobs.append(TuneJob(case, layout, tuple(candidates)))
    if not jobs and fp8_left:
        raise BadInputError(
            f"mode {', '.join(modes)}: an fp8 case tunes its forward only (kernel fp8; its "
            "backward runs its default), and this mode has no forward; use --mode fwd or "
            "fwd_bwd")
    if not jobs:
        given = ", ".join(dict.fromkeys(as_list(sweep.mode)))
        raise BadInputError(
            f"mode {', '.join(modes)}: the spec has no case to tune in it (its modes: {given}). "
            "Training cases tune in fwd, bwd or fwd_bwd; prefill_varlen and decode tune on "
            "cases of their own mode")
    return jobs
