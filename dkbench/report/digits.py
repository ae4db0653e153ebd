"""How many digits a table needs so that two different numbers never read the same: two
providers at 2.77441 and 2.77449 ms must not both show 2.774, with the star on one of them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable


def distinct_digits(values: Iterable[float], render: Callable[[float, int], str], start: int,
                    stop: int = 17) -> int:
    """The fewest digits from ``start`` on at which ``render(value, digits)`` tells every two
    different ``values`` apart (NaN left out); ``stop`` when none below it does."""
    distinct = sorted({v for v in map(float, values) if not math.isnan(v)})
    for digits in range(start, stop):
        if len({render(v, digits) for v in distinct}) == len(distinct):
            return digits
    return stop
