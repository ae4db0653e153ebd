"""The harness reads the kernel registry: the tuner's kernels and spaces, and tune's help."""

from __future__ import annotations

from dkbench.commands.tune import tune
from dkbench.tune.space import GPU_SPACES, MODE_KERNELS
from kernels import KERNELS
from kernels.registry import TUNABLE


def test_tune_searches_exactly_the_tunable_kernels_with_their_implementations() -> None:
    assert tuple(GPU_SPACES) == TUNABLE
    for name in TUNABLE:
        assert GPU_SPACES[name]["impl"] == KERNELS[name].impls
    assert MODE_KERNELS == {"fwd": ("fwd",), "bwd": ("bwd", "dq"), "fwd_bwd": TUNABLE}


def test_tune_help_lists_each_tunable_kernel_from_the_registry() -> None:
    doc = tune.__doc__ or ""
    assert "{default_spaces}" not in doc
    listed = [line for line in doc.splitlines() if line.startswith("- ")]
    assert [line.split(" (")[0] for line in listed] == [f"- {n}" for n in TUNABLE] + [
        "- CPU interpreter"]
    for name, line in zip(TUNABLE, listed):
        assert line.startswith(f"- {name} ({KERNELS[name].description}): block_m {{"), line
    assert "num_stages {2,3,4}, impl {triton,gluon}" in listed[0]
