"""Run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels, that is before the first
import of `kernels`, which is why it happens here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN, so an element a kernel forgets to write fails."""
    import kernels.buffers

    def poisoned(shape, like, dtype):
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)

    monkeypatch.setattr(kernels.buffers, "new_output", poisoned)
