"""What every provider adapter looks like."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, Strict

from kernels import BlockLayout

from ...spec.sweep import FP8, Case, Sweep


def import_failure(module: str, package: str, extra: str) -> str | None:
    """Why the optional ``module`` cannot be imported here, in its own words, with the hint to
    install the project's ``extra``; None when it imports."""
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError
        return (f"{package} is not usable here ({type(exc).__name__}: {exc}); "
                f'pip install -e ".[{extra}]"')
    return None


class Unsupported(Exception):
    """This provider cannot run this case here; the message says why (becomes status=unsupported)."""


def refuse_fp8(case: Case, why: str) -> None:
    """`Unsupported` with ``why`` (what this provider lacks) when ``case`` is an fp8 one: its
    inputs are bf16, to be quantised by a provider that computes in fp8, and a provider that
    would run them in bf16 must not pass for an fp8 row."""
    if case.dtype == FP8:
        raise Unsupported(why)


def _same(out: torch.Tensor) -> torch.Tensor:
    return out


def _same_inputs(inputs: tuple) -> tuple:
    return inputs


@dataclass
class Prepared:
    """A provider ready to run one case: ``attn(*inputs)`` on the mode's inputs (`dkbench.measure.modes`):
    ``(q, k, v)`` as ``(batch, heads, seq, dim)`` in training modes."""

    attn: Callable[..., torch.Tensor]
    config: str = ""
    config_source: str = ""
    launch_config: object = None  # the bundled kernel's LaunchConfig, reused by the check
    # Turns attn's output into the mode's canonical form, for the check only (never timed).
    canonical: Callable[[torch.Tensor], torch.Tensor] = _same
    # The inputs the reference computes on, given the mode's inputs (check only): themselves, or
    # for a provider that quantises them (fp8) the values it really computes on, dequantised, so
    # that the error measures the kernel rather than the quantisation.
    reference_inputs: Callable[[tuple], tuple] = _same_inputs


# Strict, as the rest of a spec: `"64"`, `64.0` or `true` are not block sides.
BlockSide = Annotated[int, Strict(), Field(ge=16, le=1024, multiple_of=16)]


class MaskBlocks(BaseModel):
    """Options of a provider that takes the pattern as a block mask: its (q, kv) block shape in
    tokens. `bwd_block` is the backward's; a provider whose forward and backward share one mask
    uses it for both in the training modes (bwd, fwd_bwd). None picks the provider's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    fwd_block: tuple[BlockSide, BlockSide] | None = None
    bwd_block: tuple[BlockSide, BlockSide] | None = None


class ForwardMaskBlocks(BaseModel):
    """Options of a forward-only provider that takes the pattern as a block mask: its forward's
    (q, kv) block shape in tokens. It runs no backward, so a `bwd_block` would do nothing and is
    refused as an unknown key. None picks the provider's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    fwd_block: tuple[BlockSide, BlockSide] | None = None


class Provider:
    """One attention implementation. Subclasses set the class attributes and `prepare`."""

    name: ClassVar[str]
    # "pattern": computes the case's block pattern; "dense": computes the dense (causal) problem.
    computes: ClassVar[str] = "dense"
    supports_grad: ClassVar[bool] = True
    modes: ClassVar[tuple[str, ...]] = ("fwd", "bwd", "fwd_bwd")
    # A dense provider that runs inference modes on right-padded inputs computes the padding too.
    pads_inputs: ClassVar[bool] = False
    # What a spec may set for this provider under `provider_options.<name>` (a pydantic model
    # with extra="forbid"), or None when it takes nothing.
    Options: ClassVar[type[BaseModel] | None] = None
    # Exceptions by which the wrapped library refuses a case it cannot run (its argument checks);
    # they make the row `unsupported` with the library's own words instead of `error`.
    refusals: ClassVar[tuple[type[BaseException], ...]] = ()
    # It compiles kernels at first use into a cache on disk that a later process finds (Triton's,
    # Inductor's, the CuTe DSL's, FlashInfer's JIT), so preparing it once in another process
    # first takes the compiling off the run's own set-up (`dkbench.measure.ahead`).
    compiles: ClassVar[bool] = False

    def unavailable(self, device: torch.device) -> str | None:
        """Why this provider cannot run on this device at all, or None when it can."""
        return None

    def options(self, sweep: Sweep) -> BaseModel | None:
        """This provider's options from the spec (validated when it was loaded), or defaults."""
        if self.Options is None:
            return None
        return self.Options.model_validate(sweep.provider_options.get(self.name, {}))

    def refused(self, exc: BaseException) -> str | None:
        """The reason to report when ``exc`` is the library refusing the case, else None."""
        if isinstance(exc, self.refusals) and not isinstance(exc, Unsupported):
            return f"{self.name} refused this case: {type(exc).__name__}: {exc}".strip()
        return None

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        """Everything done once per case before timing (layout index forms, block masks).

        ``config`` pins a launch config (the check reuses the timed one). Raise `Unsupported`
        when this provider cannot run this case.
        """
        raise NotImplementedError
