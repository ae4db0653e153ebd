"""Harness side of the best-config cache: error translation and rows for display.

The cache itself (format, locking, lookup) lives in `kernels.config_cache`, which kernels read at
launch without the harness.
"""

from __future__ import annotations

import errno
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kernels import CONFIG_FIELDS, CacheKey, ConfigCacheWarning

from ..errors import CacheError


@contextmanager
def cache_errors() -> Iterator[None]:
    """Turn the cache library's ValueError / OSError (bad file, unwritable path, stuck lock)
    into `CacheError`, so the CLI reports it like any other harness error. A path too long for
    the OS passes through, for `plain_path_errors` to report with the limits."""
    try:
        yield
    except (ValueError, OSError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
            raise
        raise CacheError(str(e)) from e


@contextmanager
def cache_warnings(show: Callable[[str], None]) -> Iterator[None]:
    """Hand each `ConfigCacheWarning` (a bad cache file a lookup ignored) raised inside the block
    to ``show``, once per message, instead of Python's ``file:line: Warning`` print; other
    warnings pass through unchanged."""
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigCacheWarning)
        passthrough = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if not issubclass(category, ConfigCacheWarning):
                passthrough(message, category, filename, lineno, file, line)
            elif str(message) not in seen:
                seen.add(str(message))
                show(str(message))

        warnings.showwarning = showwarning
        yield


@dataclass(frozen=True)
class CacheRow:
    """One cache entry for a table: its key, the config as text, and its timings."""

    key: CacheKey
    config: str
    ms: float
    default_ms: float
    speedup: float
    tuned_at: str
    source: str


def format_config(config: Mapping[str, Any]) -> str:
    """``{"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3}`` -> ``64x32 w4 s3``
    (``gluon 128x128 w4 s3`` for the Gluon forward)."""
    text = (
        f"{config['block_m']}x{config['block_n']} w{config['num_warps']} s{config['num_stages']}"
    )
    if config.get("impl", "triton") != "triton":
        text = f"{config['impl']} {text}"
    extra = [f"{k}={v}" for k, v in sorted(config.items())
             if k not in CONFIG_FIELDS and k != "impl"]
    return " ".join([text, *extra])


def cache_rows(entries: Mapping[str, Mapping[str, Any]]) -> list[CacheRow]:
    """Rows for ``ConfigCache.entries()``, sorted by machine, kernel and problem size."""
    rows = []
    for entry in entries.values():
        key, ms = entry["key"], float(entry["ms"])
        # null where the default config failed when the winner was tuned
        default_ms = math.nan if entry["default_ms"] is None else float(entry["default_ms"])
        rows.append(
            CacheRow(
                CacheKey.from_dict(key),
                config=format_config(entry["config"]),
                ms=ms,
                default_ms=default_ms,
                # The tuned config's gain over the default launch config; nan if ms is unusable.
                speedup=default_ms / ms if ms > 0 else math.nan,
                tuned_at=str(entry.get("tuned_at", "")),
                source=str(entry.get("source", "")),
            )
        )
    rows.sort(key=lambda r: (r.key.gpu, r.key.capability, r.key.triton, r.key.kernel,
                             r.key.dtype, r.key.head_dim, r.key.block_size, r.key.seqlen_bucket,
                             r.key.density_bucket))
    return rows
