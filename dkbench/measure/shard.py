"""Split a sweep's cases across machines (`--shard I/N`) and order them largest first.

The rule: sort the cases by estimated cost, largest first (ties broken by `case_id`), and deal them
round-robin, so shard I of N takes positions I-1, I-1+N, I-1+2N, ... Cost and `case_id` depend only
on the spec (and `--only`), so every machine computes the same partition, every case lands in
exactly one shard, and each shard gets a similar mix of large and small cases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadInputError
from ..spec.sweep import Case

# Work per (query, key) pair relative to the forward pass (the FLOP model of `metrics`).
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` with 1 <= I <= N; anything else is a BadInputError."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise BadInputError(f"--shard {text!r}: expected I/N, e.g. 2/4 (the second of four shards)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise BadInputError(f"--shard {text}: I must be between 1 and N (N >= 1), got I={index}, "
                            f"N={count}")
    return Shard(index, count)


def case_cost(case: Case) -> float:
    """A rough size of a case: dense (query, key) pairs x head_dim x heads x batch x mode factor."""
    return (case.batch * case.heads * case.q_len * case.seqlen * case.head_dim
            * MODE_FACTOR.get(case.mode, 1.0))


def largest_first(cases: list[Case]) -> list[int]:
    """Indices into ``cases``, largest estimated cost first, ties by case_id (deterministic)."""
    return sorted(range(len(cases)), key=lambda i: (-case_cost(cases[i]), cases[i].case_id, i))


def shard_cases(cases: list[Case], shard: Shard | None) -> list[Case]:
    """The cases of one shard, in their original (spec) order; all of them without a shard."""
    if shard is None or shard.count == 1:
        return list(cases)
    mine = set(largest_first(cases)[shard.index - 1::shard.count])
    return [case for i, case in enumerate(cases) if i in mine]
