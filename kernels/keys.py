"""Cache keys: what makes a launch config valid and fast, with the shape buckets and the hash of
a kernel's source that key it. Standard library only; never imports dkbench."""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

_DENSITY_STEP = 0.05
_HASH_CHARS = 8
# How a kernel walks a 128-row tile's kv blocks, a property of the pattern: "union" (the blocks
# either half keeps, both consumers on every step) or "owned" (each half on the blocks its own
# rows keep, where the halves keep different ones: kernels/halves_plan.py). The forward's and the
# dq kernel's best configs differ between the two, at the same length and density.
STEP_FORMS = ("union", "owned")


@dataclass(frozen=True)
class CacheKey:
    """What makes a launch config valid and fast: the machine, the versions, the problem bucket."""

    gpu: str
    capability: str
    triton: str
    kernel: str
    kernel_hash: str
    dtype: str
    head_dim: int
    block_size: int
    seqlen_bucket: int
    density_bucket: float
    # One of STEP_FORMS; entries written before it existed are "union", and so is their string.
    steps: str = "union"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "str" and not isinstance(value, str):
                raise ValueError(f"CacheKey.{f.name} must be a str, got {value!r}")
            # bool is an int subclass; a True head_dim is a bug, not a size.
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"CacheKey.{f.name} must be an int, got {value!r}")
        density = self.density_bucket
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise ValueError(f"CacheKey.density_bucket must be a float, got {density!r}")
        if self.steps not in STEP_FORMS:
            raise ValueError(f"CacheKey.steps must be one of {', '.join(STEP_FORMS)}, "
                             f"got {self.steps!r}")
        # Normalised so that 0.35 and 0.35000000000000003 name the same entry.
        object.__setattr__(self, "density_bucket", round(float(self.density_bucket), 2))

    def as_str(self) -> str:
        """Stable, human-readable key string, e.g.
        ``NVIDIA H100 80GB HBM3|9.0|3.6.0|fwd|ab12cd34|bfloat16|d128|bs64|s8192|p0.35``, with
        ``|owned`` after it for a pattern of owned steps."""
        return (
            f"{self.gpu}|{self.capability}|{self.triton}|{self.kernel}|{self.kernel_hash}|"
            f"{self.dtype}|d{self.head_dim}|bs{self.block_size}|s{self.seqlen_bucket}|"
            f"p{self.density_bucket:.2f}" + ("" if self.steps == "union" else f"|{self.steps}")
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (the ``"key"`` of an entry)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheKey:
        """Build a key from its dict form; missing or unknown fields raise ValueError (``steps``
        may be missing: a key written before it existed is "union")."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a cache key must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - d.keys() - {"steps"})
        unknown = sorted(d.keys() - names)
        if missing or unknown:
            raise ValueError(f"bad cache key fields: missing {missing}, unknown {unknown}")
        return cls(**{name: d[name] for name in names if name in d})


def seqlen_bucket(seqlen: int) -> int:
    """The next power of two >= ``seqlen`` (1 -> 1, 1000 -> 1024, 1024 -> 1024)."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen must be a positive int, got {seqlen!r}")
    return 1 << (seqlen - 1).bit_length()


def density_bucket(density: float) -> float:
    """``density`` rounded up to the next multiple of 0.05, within [0.05, 1.0] (0.151 -> 0.2)."""
    if not math.isfinite(density) or density < 0:
        raise ValueError(f"density must be a finite number >= 0, got {density!r}")
    # The epsilon stops float noise bumping an exact multiple up (0.55 / 0.05 = 11.000000000000002).
    steps = math.ceil(density / _DENSITY_STEP - 1e-9)
    steps = min(max(steps, 1), round(1.0 / _DENSITY_STEP))
    return round(steps * _DENSITY_STEP, 2)


def _source_bytes(obj: object) -> bytes:
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, str):
        return obj.encode()
    # A triton JITFunction (or InterpretedFunction, or an Autotuner around one) is not a function
    # to `inspect`; the Python function it wraps is, and is the same whether or not interpreting.
    for _ in range(8):
        inner = getattr(obj, "fn", None)
        if inspect.isfunction(obj) or inner is None:
            break
        obj = inner
    try:
        return inspect.getsource(obj).encode()  # type: ignore[arg-type]
    except (OSError, TypeError):
        pass
    # No source (a frozen app, a .pyc-only install): the module file still changes with the code.
    module = obj if inspect.ismodule(obj) else sys.modules.get(getattr(obj, "__module__", "") or "")
    filename = getattr(module, "__file__", None)
    if filename and os.path.exists(filename):
        return Path(filename).read_bytes()
    raise TypeError(f"cannot find the source of {obj!r} to hash")


def source_hash(*objects: object) -> str:
    """Short sha256 (8 hex digits) of the source of functions, modules or JIT kernels.

    Falls back to the bytes of the object's module file when ``inspect.getsource`` fails; str and
    bytes are hashed as given. Used as ``CacheKey.kernel_hash`` so an edited kernel never reuses a
    stale config.
    """
    if not objects:
        raise ValueError("source_hash needs at least one object")
    digest = hashlib.sha256()
    for obj in objects:
        data = _source_bytes(obj)
        # Length-prefixed so that ("ab", "c") and ("a", "bc") hash differently.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:_HASH_CHARS]
