"""What starting the command costs: `import dkbench.cli` (every command's start, and every worker
process a run or tune starts) must not import torch._dynamo. It is over a second here and several
on a machine without byte-code caches, and only FlexAttention's provider (which imports it when it
prepares) needs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_command_starts_without_torch_dynamo() -> None:
    probe = ("import sys, dkbench.cli, dkbench.tune.precompile, dkbench.measure.runner; "
             "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported at start: {done.stdout.strip()}"
