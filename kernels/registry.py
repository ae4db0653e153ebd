"""One record per kernel: what the config cache hashes, which implementations run it, how a call
pins its launch config, and whether `dkbench tune` tunes it.

Everything that needs to know about a kernel (the cache key's source hash, the config arguments
of :func:`kernels.sparse_attention`, the tuner's kernels, the CLI's help) reads it from here.
Standard library only, and no import of the other kernels modules: they import this one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelRecord:
    """What the library and the harness know about one kernel."""

    name: str
    description: str  # one line, shown in help
    # The modules whose source keys the kernel's cached configs (``select.kernel_hash``), in
    # hashing order: the module that defines the kernel and every module it takes jit helpers
    # from. Reordering or adding one changes the hash, so shipped configs stop applying.
    sources: tuple[str, ...]
    impls: tuple[str, ...]  # LaunchConfig.impl values that can run it
    # The keyword of ``sparse_attention`` that pins its launch config; None where the kernel is
    # reached through another function (varlen and decode).
    config_argument: str | None
    tunable: bool  # `dkbench tune` searches its launch configs


_RECORDS = (
    # The forward's configs choose between two modules (Triton and Gluon), so it hashes both,
    # and the schedule the Gluon one walks.
    KernelRecord("fwd", "the forward in Triton, or warp-specialised Gluon on Hopper",
                 ("kernels.fwd", "kernels.fwd_ws", "kernels.schedule"), ("triton", "gluon"),
                 "config", True),
    # The backward's two kernels live in one module and have different best tiles.
    KernelRecord("bwd", "the backward's dk/dv kernel", ("kernels.bwd",), ("triton",),
                 "bwd_config", True),
    KernelRecord("dq", "the backward's dq kernel", ("kernels.bwd",), ("triton",),
                 "dq_config", True),
    # Its loop is the forward's _attn_fwd_inner; it launches with the forward's configs.
    KernelRecord("varlen", "the forward over packed or left-padded sequences (chunked prefill)",
                 ("kernels.varlen", "kernels.fwd"), ("triton",), None, False),
    # Its split count is chosen per call: no tile config to tune.
    KernelRecord("decode", "decoding, one new token per sequence against its KV cache",
                 ("kernels.decode",), ("triton",), None, False),
)

KERNELS: dict[str, KernelRecord] = {record.name: record for record in _RECORDS}

# The kernels `dkbench tune` tunes, in registry order.
TUNABLE: tuple[str, ...] = tuple(name for name, record in KERNELS.items() if record.tunable)
