"""Pattern entries of a spec that once broke `dkbench validate`: file paths the OS refuses, files
that are not files, tensors without values, a symlink that merged two cases into one id, and
settings that the spec's own rules meant to refuse or accept. Each goes through the real CLI (or
`load_spec`, what it calls) and must exit 2 naming the file and key, or load."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dkbench.errors import SpecError
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand

from .cli_helpers import flat, invoke
from .specs import write_pattern, write_spec

LOCAL = {"type": "local_stride", "block_size": 16, "local_blocks": 1, "vert_stride": 2}
LOWER = np.tril(np.ones((1, 2, 2), dtype=bool))  # covers the tiny spec's 32 tokens


def file_spec(folder: Path, path: str, **overrides: Any) -> Path:
    return write_spec(folder, patterns=[{"type": "file", "path": path, "block_size": 16}],
                      **overrides)


def refused(spec: Path, *phrases: str) -> str:
    """`validate SPEC` exits 2 without a traceback, its message naming the spec and ``phrases``."""
    result = invoke("validate", spec)
    message = flat(result.stderr)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert message.startswith(f"error: {spec}: "), message
    for phrase in phrases:
        assert phrase in message, message
    return message


# -- paths the OS refuses --

def test_pattern_path_with_a_nul_character(tmp_path: Path) -> None:
    # Path.resolve() raised "embedded null byte" out of the loader.
    refused(file_spec(tmp_path, "a\x00b.npy"), "patterns[0].file.path:", "NUL character",
            "allowed: a .npy, .pt or .pth file")


def test_pattern_path_too_long_for_the_os(tmp_path: Path) -> None:
    # stat() raised ENAMETOOLONG (an OSError) through the validation.
    name = "x" * 4000 + ".npy"
    refused(file_spec(tmp_path, name), "patterns: file(", "cannot be read: File name too long")


def test_pattern_path_empty(tmp_path: Path) -> None:
    # "" became the spec's own folder, reported as "expected a .npy or .pt file".
    refused(file_spec(tmp_path, ""), "patterns[0].file.path: an empty path",
            "allowed: a .npy, .pt or .pth file")


# -- files that are not regular files --

@pytest.mark.parametrize("name", [".", "folder.npy"])
def test_pattern_path_is_a_directory(tmp_path: Path, name: str) -> None:
    (tmp_path / "folder.npy").mkdir()
    refused(file_spec(tmp_path, name), "is a directory; allowed: a .npy, .pt or .pth file")


def test_pattern_fifo_is_refused_without_reading_it(tmp_path: Path) -> None:
    # np.load opened the FIFO and waited for a writer forever; validate never returned.
    fifo = tmp_path / "pattern.npy"
    os.mkfifo(fifo)
    spec = file_spec(tmp_path, "pattern.npy")
    errors: list[str] = []

    def validate() -> None:
        try:
            load_spec(spec)
        except SpecError as exc:
            errors.append(str(exc))

    worker = threading.Thread(target=validate, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # blocked opening the FIFO: a writer lets it go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=20)
        pytest.fail("validating a spec whose pattern file is a FIFO blocked reading it")
    assert errors and "is not a regular file (a FIFO, socket or device)" in errors[0], errors


# -- tensors without values --

def quantized(pattern: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # quantize_per_tensor warns that it is deprecated
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(pattern.float(), 1.0, 0, torch.quint8)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch loading a quantized one
@pytest.mark.parametrize(("make", "dtype"), [
    (lambda t: t.to("meta"), "torch.bool tensor on meta"),  # NotImplementedError, a traceback
    (quantized, "torch.quint8 tensor on cpu"),  # a TypeError message that named no file
], ids=["meta", "quantized"])
def test_pt_pattern_of_a_tensor_without_values(tmp_path: Path, make: Any, dtype: str) -> None:
    torch.save(make(torch.from_numpy(LOWER)), tmp_path / "p.pt")
    message = refused(file_spec(tmp_path, "p.pt"), f"pattern file {tmp_path / 'p.pt'} holds a",
                      dtype, "a pattern is a dense bool or integer 0/1 tensor")
    assert "no array of values" in message, message


# -- what the spec says, kept --

def test_symlinked_pattern_file_keeps_its_own_label(tmp_path: Path) -> None:
    # The relative path was resolve()d after the labels were checked distinct: the link took its
    # target's name, and the two cases one label and one case id (two rows under one id).
    write_pattern(tmp_path, LOWER, "mask.npy")
    (tmp_path / "alias.npy").symlink_to("mask.npy")
    spec = write_spec(tmp_path, patterns=[{"type": "file", "path": p, "block_size": 16}
                                          for p in ("mask.npy", "alias.npy")])
    cases = expand(load_spec(spec))
    assert [c.pattern.label() for c in cases] == ["file(mask.npy,bs16)", "file(alias.npy,bs16)"]
    assert len({c.case_id for c in cases}) == 2
    assert cases[1].pattern.path == str(tmp_path / "alias.npy")


def test_pattern_file_suffix_in_upper_case_loads(tmp_path: Path) -> None:
    np.save(tmp_path / "mask.npy", LOWER)
    (tmp_path / "mask.npy").rename(tmp_path / "MASK.NPY")
    (case,) = expand(load_spec(file_spec(tmp_path, "MASK.NPY")))
    assert case.pattern.load().tolist() == LOWER.tolist()


def test_homo_head_with_head_sliding_step_zero(tmp_path: Path) -> None:
    # `0 not in (False, None)` is False (0 == False): step 0 beside homo_head slipped through.
    refused(write_spec(tmp_path, patterns=[{**LOCAL, "homo_head": True, "head_sliding_step": 0}]),
            "patterns[0].local_stride: homo_head: true", "leaves head_sliding_step nothing to do")


@pytest.mark.parametrize("density", [float("nan"), float("inf")])
def test_random_density_not_a_number(tmp_path: Path, density: float) -> None:
    # nan was "must be less than or equal to 1.0, got nan", as if a smaller nan would do.
    refused(write_spec(tmp_path, patterns=[{"type": "random", "block_size": 16,
                                            "density": density}]),
            "patterns[0].random.density:", "is not a finite number",
            "allowed: numbers > 0.0 and <= 1.0")


def test_patterns_that_differ_only_in_head_step_or_sharing_have_their_own_labels() -> None:
    from dkbench.spec.patterns import LocalStridePattern, RandomPattern

    base = {"type": "local_stride", "block_size": 16, "local_blocks": 2, "vert_stride": 4}
    labels = {LocalStridePattern(**base).label(),
              LocalStridePattern(**base, head_sliding_step=1).label(),
              LocalStridePattern(**base, head_sliding_step=2).label()}
    assert len(labels) == 3, labels
    assert LocalStridePattern(**base).label() == "local_stride(bs16,l2,s4,head,off0)"  # as before
    rand = {"type": "random", "block_size": 16, "density": 0.5}
    assert RandomPattern(**rand).label() == "random(bs16,d0.5,seed0)"  # as before
    assert RandomPattern(**rand, per_head=False).label() == "random(bs16,d0.5,seed0,shared)"
