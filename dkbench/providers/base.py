"""What every provider adapter looks like."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from kernels import BlockLayout

from ..spec import Case, Sweep

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Unsupported(Exception):
    """This provider cannot run this case here; the message says why (becomes status=unsupported)."""


@dataclass
class Prepared:
    """A provider ready to run one case: ``attn(q, k, v)`` on ``(batch, heads, seq, dim)`` inputs."""

    attn: AttnFn
    config: str = ""
    config_source: str = ""
    launch_config: object = None  # the bundled kernel's LaunchConfig, reused by the check


class Provider:
    """One attention implementation. Subclasses set the class attributes and `prepare`."""

    name: ClassVar[str]
    # "pattern": computes the case's block pattern; "dense": computes the dense (causal) problem.
    computes: ClassVar[str] = "dense"
    supports_grad: ClassVar[bool] = True

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
