"""Builders for tiny sweep specs written to a test's tmp_path.

`TINY` runs in a fraction of a second on the CPU (on any machine: its device is pinned), sdpa_math
only, one 32-token case. Tests override the keys they care about; an override of ``None`` removes
the key.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

# The bundled kernel runs on CPU tensors only through Triton's interpreter, which conftest turns on
# when there is no GPU; on a GPU machine the kernel tests cover it on the GPU instead.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the bundled kernel on the CPU through Triton's interpreter")

TINY: dict[str, Any] = {
    "name": "tiny",
    "device": "cpu",
    "dtype": "fp32",
    "mode": "fwd",
    "batch": 1,
    "seqlen": 32,
    "heads": 2,
    "kv_heads": 1,
    "head_dim": 16,
    "causal": True,
    "patterns": [{"type": "local_stride", "block_size": 16, "local_blocks": 1, "vert_stride": 2}],
    "providers": ["sdpa_math"],
    "timing": {"warmup_ms": 1, "rep_ms": 1},
    "check": {"max_tokens": 256},
}


def spec_dict(**overrides: Any) -> dict[str, Any]:
    """`TINY` with keys replaced (``None`` drops the key)."""
    spec = copy.deepcopy(TINY)
    for key, value in overrides.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def write_spec(folder: Path, filename: str = "spec.yaml", **overrides: Any) -> Path:
    """Write `spec_dict(**overrides)` as YAML into ``folder`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(yaml.safe_dump(spec_dict(**overrides), sort_keys=False))
    return path


def write_pattern(folder: Path, pattern: np.ndarray, filename: str = "pattern.npy") -> Path:
    """Save a block pattern ``(heads or 1, q_blocks, k_blocks)`` for a ``type: file`` entry."""
    path = folder / filename
    np.save(path, pattern)
    return path
