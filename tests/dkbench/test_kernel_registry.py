"""The harness reads the kernel registry: the tuner's kernels and spaces, and tune's help."""

from __future__ import annotations

from dkbench.commands.tune import tune
from dkbench.tune.plan import MODE_KERNELS
from dkbench.tune.space import GPU_SPACES, TUNED
from kernels import KERNELS
from kernels.registry import TUNABLE


def test_tune_searches_exactly_the_tunable_kernels_with_their_spaces() -> None:
    assert TUNED == tuple(name for name, record in KERNELS.items() if record.tunable)
    assert tuple(GPU_SPACES) == TUNED
    for name in TUNED:
        assert GPU_SPACES[name] is KERNELS[name].search_space
        assert GPU_SPACES[name]["impl"] == KERNELS[name].impls
    assert MODE_KERNELS == {"fwd": ("fwd",), "bwd": ("bwd", "dq"), "fwd_bwd": TUNABLE,
                            "prefill_varlen": ("varlen",), "decode": ("decode",)}


def test_tune_help_lists_each_tunable_kernel_from_the_registry() -> None:
    doc = tune.__doc__ or ""
    assert "{default_spaces}" not in doc
    listed = [line for line in doc.splitlines() if line.startswith("- ")]
    assert [line.split(" (")[0] for line in listed] == [f"- {n}" for n in TUNED] + [
        "- CPU interpreter"]
    for name, line in zip(TUNED, listed):
        assert line.startswith(f"- {name} ({KERNELS[name].description}): block_m {{"), line
    assert "num_stages {2,3,4}, impl {triton,gluon}" in listed[0]
    assert "- decode (" in doc and "block_m {16}, block_n {32,64,128}" in doc
