"""Pick the launch config for a call: user cache, then shipped tuned configs (this GPU's, else
those of another GPU of its compute capability), then defaults.

Resolution is memoised per (kernel, device, dtype, head_dim, block size, shape bucket), and per
layout and call shape in front of that, so a training loop or a decoding loop pays for the lookup
once, not per call (until :func:`clear_memo`).
"""

from __future__ import annotations

import functools
import sys
import weakref
from pathlib import Path

import torch
import triton

from . import config_cache, halves_plan
from .configs import LaunchConfig, config_problems, default_config
from .layout import BlockLayout, is_int
from .registry import KERNELS

SHIPPED_DIR = Path(__file__).parent / "tuned"

_memo: dict[tuple, tuple[LaunchConfig, str]] = {}
# The same resolutions by layout and call (kernel, device, dtype, head_dim, seq_k, density, cache
# path): a repeated call costs two dict lookups, not a cache key. Weak, so layouts can go.
_by_layout: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_memo() -> None:
    """Forget resolved configs (after the cache was written, or to pick up a new cache path)."""
    _memo.clear()
    _by_layout.clear()
    _user_cache.cache_clear()


@functools.lru_cache(maxsize=None)
def _user_cache(path: str | None) -> config_cache.ConfigCache:
    return config_cache.ConfigCache(path)


@functools.lru_cache(maxsize=None)
def _shipped() -> dict[str, dict]:
    entries: dict[str, dict] = {}
    for file in sorted(SHIPPED_DIR.glob("*.json")):
        entries.update(config_cache.load_shipped(file))
    return entries


@functools.lru_cache(maxsize=None)
def kernel_hash(kernel: str) -> str:
    """Hash of the kernel's source: an edited kernel never reuses a config tuned for the old one.

    It covers the modules of the kernel's record, ``KERNELS[kernel].sources``, in their order.
    """
    modules = KERNELS[kernel].sources
    for module in modules:
        __import__(module)
    return config_cache.source_hash(*(sys.modules[module] for module in modules))


def _check_kernel(kernel: str) -> None:
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; the kernels are {', '.join(KERNELS)}")


def _check_layout_call(layout: BlockLayout, seq_k: int) -> None:
    """A layout and a key length a lookup can read (no keys would divide by zero)."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if not is_int(seq_k):
        raise TypeError(f"seq_k must be an int, got {type(seq_k).__name__} {seq_k!r}")
    if seq_k < 1:
        raise ValueError(f"seq_k must be >= 1, got {seq_k}")


def block_density(layout: BlockLayout, seq_k: int) -> float:
    """Share of the (causal) blocks kept for ``seq_k`` keys: the cheap density used for bucketing."""
    _check_layout_call(layout, seq_k)
    def build() -> float:
        nb = triton.cdiv(seq_k, layout.block_size)
        kept = int(layout.pattern[:, :nb, :nb].sum())
        total = nb * (nb + 1) // 2 if layout.causal else nb * nb
        return kept / (total * layout.heads)
    return layout.cached(("block_density", seq_k), build)


# The identity of any non-CUDA device: kernels only run there through Triton's interpreter, so
# entries under it are written by a CPU tune (pipeline checks), never by a GPU one.
CPU_IDENTITY = ("cpu (triton interpreter)", "")


def device_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability) of a CUDA device; :data:`CPU_IDENTITY` for any other."""
    if device.type != "cuda":
        return CPU_IDENTITY
    props = torch.cuda.get_device_properties(device)
    return props.name, f"{props.major}.{props.minor}"


# The kernels with a form on owned steps, and the 64-key boxes a step their classification
# assumes (their default configs' on Hopper).
OWNED_STEP_BOXES = {"fwd": 2, "dq": 1}


def step_form(kernel: str, layout: BlockLayout, seq_k: int) -> str:
    """How ``kernel`` walks this pattern's tiles, for the cache key (kernels.keys.STEP_FORMS):
    "owned" where the owned steps' estimate pays (kernels.halves_plan.halves_pay at the fewest
    stages they take), else "union". Only the forward and the dq kernel have the two forms."""
    _check_kernel(kernel)
    _check_layout_call(layout, seq_k)
    if kernel not in OWNED_STEP_BOXES:
        return "union"
    owned = halves_plan.halves_pay(layout, seq_k, halves_plan.MIN_STAGES,
                                   OWNED_STEP_BOXES[kernel])
    return "owned" if owned else "union"


def cache_key(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int,
              block_size: int, seq_k: int, density: float, steps: str = "union"
              ) -> config_cache.CacheKey:
    """The key of ``kernel``'s configs for this call's shape bucket and step form (``steps``,
    from :func:`step_form`)."""
    _check_kernel(kernel)
    gpu, capability = device_identity(device)
    return config_cache.CacheKey(
        gpu=gpu, capability=capability, triton=triton.__version__, kernel=kernel,
        kernel_hash=kernel_hash(kernel), dtype=str(dtype).removeprefix("torch."),
        head_dim=head_dim, block_size=block_size,
        seqlen_bucket=config_cache.seqlen_bucket(seq_k),
        density_bucket=config_cache.density_bucket(density), steps=steps)


def layout_key(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int,
               layout: BlockLayout, seq_k: int, density: float | None = None
               ) -> config_cache.CacheKey:
    """The key a launch of ``kernel`` on ``layout`` looks its config up under, and a tune of it
    writes to: :func:`cache_key` with the layout's block size, its density (``density``, or
    :func:`block_density`'s) and its :func:`step_form`."""
    if density is None:
        density = block_density(layout, seq_k)
    return cache_key(kernel, device, dtype, head_dim, layout.block_size, seq_k, density,
                     step_form(kernel, layout, seq_k))


def resolve_config(kernel: str, q: torch.Tensor, layout: BlockLayout, seq_k: int,
                   density: float | None = None, cache_path: str | None = None
                   ) -> tuple[LaunchConfig, str]:
    """The config to launch ``kernel`` (a name of :data:`kernels.KERNELS`) with and where it came
    from: ``cache``, ``shipped``, ``shipped:<gpu>`` (another GPU of this architecture) or
    ``default``. ``q`` carries the device, dtype and head_dim (its last dimension)."""
    _check_kernel(kernel)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor (its device, dtype and head_dim are looked "
                        f"up), got {type(q).__name__}")
    _check_layout_call(layout, seq_k)
    calls = _by_layout.setdefault(layout, {})
    call = (kernel, q.device, q.dtype, q.shape[-1], seq_k, density, cache_path)
    if call not in calls:
        calls[call] = _resolve(kernel, q, layout, seq_k, density, cache_path)
    return calls[call]


def _resolve(kernel: str, q: torch.Tensor, layout: BlockLayout, seq_k: int,
             density: float | None, cache_path: str | None) -> tuple[LaunchConfig, str]:
    head_dim, block_size = q.shape[-1], layout.block_size
    fallback = default_config(kernel, q.device, block_size, head_dim, q.dtype)
    # A non-CUDA device (the interpreter) is looked up too, under CPU_IDENTITY: a CPU tune writes
    # there, which is how the tune -> cache -> run pipeline is tested without a GPU.
    key = layout_key(kernel, q.device, q.dtype, head_dim, layout, seq_k, density)
    memo_key = (key, cache_path)
    if memo_key not in _memo:
        _memo[memo_key] = _lookup(key, cache_path, block_size, head_dim) or (fallback, "default")
    return _memo[memo_key]


def _candidates(key: config_cache.CacheKey, cache_path: str | None):
    """(source, config dict or None) in lookup order: the user cache, this GPU's shipped entry,
    then the shipped entries of other GPUs of the same compute capability (the same
    architecture runs the same code: an H100's configs serve an H200), by GPU name."""
    yield "cache", _user_cache(cache_path).get(key)
    shipped = _shipped()
    entry = shipped.get(key.as_str())
    yield "shipped", entry["config"] if entry else None
    if not key.capability:
        return  # not a GPU: no architecture to share
    wanted = key.to_dict()
    same_arch = [(e["key"]["gpu"], e["config"]) for e in shipped.values()
                 if e["key"]["gpu"] != key.gpu and {**e["key"], "gpu": key.gpu} == wanted]
    for gpu, config in sorted(same_arch, key=lambda found: found[0]):
        yield f"shipped:{gpu}", config


def _lookup(key: config_cache.CacheKey, cache_path: str | None, block_size: int,
            head_dim: int) -> tuple[LaunchConfig, str] | None:
    """The first usable config and its source (``cache``, ``shipped``, or ``shipped:<gpu>``
    for another GPU's entry); None means the default.

    An unreadable user cache reads as empty (ConfigCache warns, naming it, and leaves it), and
    a config that this block size cannot use (hand-edited file) is skipped: either way the next
    source answers, never an error in the launch.
    """
    for source, found in _candidates(key, cache_path):
        if found is None:
            continue
        config = LaunchConfig.from_dict(found)
        if not config_problems(config, block_size, head_dim, key.kernel):
            return config, source
    return None
