"""Where a tune's wall time goes: seconds per phase (compile, prepare, screen, final timing)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from ..startup import STARTUP

# In the order a kernel's candidates go through them, with the words the summary uses.
PHASES = {"compile": "compile", "prepare": "prepare and check", "screen": "screen",
          "final": "final timing"}


class Stopwatch:
    """Wall seconds per phase, added up over every kernel of every case."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown tune phase {name!r} (phases: {', '.join(PHASES)})")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {name: round(self.seconds[name], 2) for name in PHASES if name in self.seconds}

    def line(self, wall_s: float, startup_s: float | None = None) -> str:
        """``Took 95 s: compile 30 s, prepare and check 20 s, screen 15 s, final timing 25 s,
        the rest 5 s.`` With ``startup_s`` (the command's seconds before the tune began), those
        count too: ``Took 105 s: start-up 10 s (imports, spec, plan), compile 30 s, ...``."""
        parts = [f"{PHASES[name]} {seconds:.0f} s" for name, seconds in self.as_dict().items()]
        if startup_s is not None:
            parts.insert(0, f"{STARTUP} {startup_s:.0f} s")
        rest = wall_s - sum(self.seconds.values())
        total = wall_s + (startup_s or 0.0)
        return f"Took {total:.0f} s: " + ", ".join([*parts, f"the rest {max(rest, 0.0):.0f} s"]) + "."
