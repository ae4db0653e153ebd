"""Work schedules for persistent kernels: which work items each program takes, in which order.

A persistent kernel launches one program per SM and each program walks a list of work items.
Dealing the items out round-robin gives every program the same number of items but not the same
work when items differ in size (a causal tile late in a sequence keeps more blocks than an early
one), and the kernel lasts as long as its busiest program. :func:`balanced_schedule` deals the
items in their natural order, each to the program with the least work so far, as a dynamic
scheduler would at run time: the totals end within one item of each other, and items that are
neighbours in the natural order (the same heads, so the same k/v in L2) still run at about the
same time.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """Program ``p`` takes items ``order[starts[p]:starts[p+1]]``, in that order."""

    order: torch.Tensor  # int32 (items,)
    starts: torch.Tensor  # int32 (programs + 1,)


def balanced_schedule(costs: torch.Tensor, programs: int) -> Schedule:
    """Deal items ``0..len(costs)-1`` to ``programs`` programs, each to the least loaded so far.

    ``costs`` is each item's estimated run time, in any unit. Ties go to the lowest program,
    so equal costs give the round-robin deal.
    """
    if costs.dim() != 1 or len(costs) == 0:
        raise ValueError(f"costs must be a non-empty 1-d tensor, got shape {tuple(costs.shape)}")
    if programs < 1:
        raise ValueError(f"programs must be positive, got {programs}")
    load = [(0.0, p) for p in range(programs)]
    owner = [0] * len(costs)
    for item, cost in enumerate(costs.tolist()):
        total, p = heapq.heappop(load)
        owner[item] = p
        heapq.heappush(load, (total + cost, p))
    owners = torch.tensor(owner, dtype=torch.int64)
    # A stable sort by owner keeps each program's items in their natural order.
    order = torch.argsort(owners, stable=True).to(torch.int32)
    starts = torch.zeros(programs + 1, dtype=torch.int32)
    starts[1:] = torch.bincount(owners, minlength=programs).cumsum(0)
    return Schedule(order, starts)
