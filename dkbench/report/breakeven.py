"""The break-even density: below which density a sparse kernel beats the fastest dense one.

Plain arithmetic on a sparse kernel's measured (density, ms) points and one dense time, so that
the rule can be checked by hand: scanning up from the lowest measured density, the break-even is
where the kernel first stops being faster, interpolated linearly (in ms against density) between
the last density where it was faster and the first where it is not. A kernel that is faster at
every measured density breaks even `ALWAYS` (as far as was measured), one that is slower even at
the lowest `NEVER`. Points from a kernel whose time does not grow with density may cross more than
once; the first crossing from below is the one reported, the density a user can stay under.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

CROSSES, ALWAYS, NEVER = "crosses", "always", "never"


@dataclass(frozen=True)
class BreakEven:
    """``verdict`` is CROSSES (``density`` is where the kernel meets the dense time), ALWAYS or
    NEVER (``density`` None); ``lowest`` and ``highest`` are the measured densities' range."""

    verdict: str
    density: float | None
    lowest: float
    highest: float

    def text(self) -> str:
        """The verdict in words, for a table cell or a figure."""
        if self.verdict == ALWAYS:
            return f"always (faster at every measured density, up to {self.highest:.3g})"
        if self.verdict == NEVER:
            return f"never (slower at every measured density, from {self.lowest:.3g})"
        return f"{self.density:.3g}"


def median_points(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """(density, ms) points sorted by density, several at one density taken at their median,
    points with a missing (NaN) value dropped."""
    by_density: dict[float, list[float]] = defaultdict(list)
    for density, ms in points:
        if math.isfinite(density) and math.isfinite(ms):
            by_density[float(density)].append(float(ms))
    return [(d, statistics.median(v)) for d, v in sorted(by_density.items())]


def break_even(points: Iterable[tuple[float, float]], dense_ms: float) -> BreakEven:
    """Where the kernel's time over ``points`` ((density, ms), any order) meets ``dense_ms``.

    Exactly at a measured density when the kernel ties the dense time there. Raises ValueError
    without a point or a dense time to compare with.
    """
    ordered = median_points(points)
    if not ordered or not math.isfinite(dense_ms):
        raise ValueError("a break-even needs measured points and a dense time")
    lowest, highest = ordered[0][0], ordered[-1][0]
    for i, (density, ms) in enumerate(ordered):
        if ms < dense_ms:
            continue
        if i == 0:
            verdict = CROSSES if ms == dense_ms else NEVER
            return BreakEven(verdict, density if verdict == CROSSES else None, lowest, highest)
        d0, t0 = ordered[i - 1]  # t0 < dense_ms <= ms, so ms > t0
        crossing = d0 + (dense_ms - t0) * (density - d0) / (ms - t0)
        return BreakEven(CROSSES, crossing, lowest, highest)
    return BreakEven(ALWAYS, None, lowest, highest)
