"""Keeping the kernels' entry points out of torch.compile's graphs.

Dynamo cannot trace the kernels' launches (under the CPU interpreter it fails inside Triton; a
compiled model that calls them would fail), so a compiled model takes a graph break at each entry
point and runs it eagerly, backward included. Nothing is marked at import: that would import
torch._dynamo, seconds that a plain use of the kernels should not pay.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def outside_compile(fn: F) -> F:
    """``fn``, run outside torch.compile's graphs: while Dynamo traces a caller, the call is a
    graph break (``fn`` disabled for Dynamo); otherwise ``fn`` itself, at the cost of one flag
    read (torch.compiler.is_compiling, which imports nothing)."""

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        return torch.compiler.disable(fn)(*args, **kwargs)

    return entry  # type: ignore[return-value]
