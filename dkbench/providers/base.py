"""What every provider adapter looks like."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from kernels import BlockLayout

from ..spec import Case, Sweep


class Unsupported(Exception):
    """This provider cannot run this case here; the message says why (becomes status=unsupported)."""


def _same(out: torch.Tensor) -> torch.Tensor:
    return out


@dataclass
class Prepared:
    """A provider ready to run one case: ``attn(*inputs)`` on the mode's inputs (`dkbench.modes`):
    ``(q, k, v)`` as ``(batch, heads, seq, dim)`` in training modes."""

    attn: Callable[..., torch.Tensor]
    config: str = ""
    config_source: str = ""
    launch_config: object = None  # the bundled kernel's LaunchConfig, reused by the check
    # Turns attn's output into the mode's canonical form, for the check only (never timed).
    canonical: Callable[[torch.Tensor], torch.Tensor] = _same


class Provider:
    """One attention implementation. Subclasses set the class attributes and `prepare`."""

    name: ClassVar[str]
    # "pattern": computes the case's block pattern; "dense": computes the dense (causal) problem.
    computes: ClassVar[str] = "dense"
    supports_grad: ClassVar[bool] = True
    modes: ClassVar[tuple[str, ...]] = ("fwd", "bwd", "fwd_bwd")
    # A dense provider that runs inference modes on right-padded inputs computes the padding too.
    pads_inputs: ClassVar[bool] = False

    def unavailable(self, device: torch.device) -> str | None:
        """Why this provider cannot run on this device at all, or None when it can."""
        return None

    def prepare(self, case: Case, layout: BlockLayout, sweep: Sweep, device: torch.device,
                scale: float, config: object = None) -> Prepared:
        """Everything done once per case before timing (layout index forms, block masks).

        ``config`` pins a launch config (the check reuses the timed one). Raise `Unsupported`
        when this provider cannot run this case.
        """
        raise NotImplementedError
