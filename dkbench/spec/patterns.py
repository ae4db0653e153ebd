"""Pattern entries of a sweep spec, and how each becomes a `BlockLayout` for a case."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kernels import BlockLayout, dense_layout, local_stride_layout, random_layout

MAX_BLOCKS = 2**24  # the longest seqlen a spec allows, in blocks of one token


class _Pattern(BaseModel):
    # strict: a YAML `true` or `64.5` is not an integer here
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    block_size: int = 64

    def label(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def layout(self, heads: int, kv_heads: int, seqlen: int, causal: bool) -> BlockLayout:
        raise NotImplementedError  # pragma: no cover


class LocalStridePattern(_Pattern):
    """phi-3-small's local-stride pattern (see `kernels.local_stride_layout`)."""

    type: Literal["local_stride"]
    # Counts of blocks: a bound well past any sequence keeps torch's int64 arithmetic in range.
    local_blocks: int = Field(16, ge=1, le=MAX_BLOCKS)
    vert_stride: int = Field(8, ge=1, le=MAX_BLOCKS)
    homo_head: bool = False
    per_kv_group: bool = False  # one pattern per GQA group instead of one per query head
    head_sliding_step: int | None = Field(None, ge=0, le=MAX_BLOCKS)
    head_sliding_offset: int = Field(0, ge=-MAX_BLOCKS, le=MAX_BLOCKS)
    num_dense_heads: int = Field(0, ge=0, le=1024)

    @model_validator(mode="after")
    def _one_head_form(self) -> "LocalStridePattern":
        """homo_head gives every head one pattern: a per-group or per-head setting beside it would
        do nothing, so it is refused rather than ignored."""
        if self.homo_head:
            # `is not`: head_sliding_step 0 equals False, and is as idle beside homo_head as 2.
            beside = [k for k in ("per_kv_group", "head_sliding_step") if k in self.model_fields_set
                      and getattr(self, k) is not False and getattr(self, k) is not None]
            if beside:
                raise ValueError(f"homo_head: true (one pattern for every head) leaves "
                                 f"{' and '.join(beside)} nothing to do; allowed: homo_head: true "
                                 "alone, or homo_head: false with per_kv_group (one pattern per "
                                 "GQA group) or head_sliding_step (a pattern per query head)")
        return self

    def label(self) -> str:
        heads = "homo" if self.homo_head else ("group" if self.per_kv_group else "head")
        extra = f",dense{self.num_dense_heads}" if self.num_dense_heads else ""
        # Named only when given, so the labels (and case ids) of specs without it stay as they
        # were; two specs that differ in it are two problems, whose case ids must differ.
        if self.head_sliding_step is not None:
            extra += f",step{self.head_sliding_step}"
        return (f"local_stride(bs{self.block_size},l{self.local_blocks},s{self.vert_stride},"
                f"{heads},off{self.head_sliding_offset}{extra})")

    def layout(self, heads: int, kv_heads: int, seqlen: int, causal: bool) -> BlockLayout:
        return local_stride_layout(
            heads, seqlen, self.block_size, self.local_blocks, self.vert_stride,
            homo_head=self.homo_head, num_kv_heads=kv_heads if self.per_kv_group else None,
            head_sliding_step=self.head_sliding_step, head_sliding_offset=self.head_sliding_offset,
            num_dense_heads=self.num_dense_heads, causal=causal)


class DensePattern(_Pattern):
    """Every block kept: the bundled kernel on the dense problem."""

    type: Literal["dense"]

    def label(self) -> str:
        return f"dense(bs{self.block_size})"

    def layout(self, heads: int, kv_heads: int, seqlen: int, causal: bool) -> BlockLayout:
        return dense_layout(-(-seqlen // self.block_size), self.block_size, causal)


class RandomPattern(_Pattern):
    """Random blocks at a given density, diagonal kept; one pattern per query head by default."""

    type: Literal["random"]
    density: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)  # .nan: not a number at all
    seed: int = Field(0, ge=0, lt=2**64)  # what torch.Generator.manual_seed takes
    per_head: bool = True

    def label(self) -> str:
        # One pattern shared by every head is another problem than one per head; named only
        # then, so the labels of per-head patterns (the default) stay as they were.
        shared = "" if self.per_head else ",shared"
        return f"random(bs{self.block_size},d{self.density},seed{self.seed}{shared})"

    def layout(self, heads: int, kv_heads: int, seqlen: int, causal: bool) -> BlockLayout:
        return random_layout(heads if self.per_head else 1, -(-seqlen // self.block_size),
                             self.block_size, self.density, self.seed, causal)


class FilePattern(_Pattern):
    """A saved boolean pattern `(heads or 1, q_blocks, k_blocks)`: `.npy` or a tensor `.pt` file.

    Loaded without executing code (`np.load(allow_pickle=False)`, `torch.load(weights_only=True)`);
    the spec loader makes a relative path relative to the spec file.
    """

    type: Literal["file"]
    path: str

    @field_validator("path")
    @classmethod
    def _a_file_name(cls, path: str) -> str:
        """An empty path would become the spec's own folder once made relative to it, and a NUL
        character is in no file name (the OS refuses it with an exception of its own)."""
        if not path.strip():
            raise ValueError(f"an empty path; allowed: a {SUFFIX_WORDS} file, absolute or relative "
                             "to the spec's folder")
        if "\x00" in path:
            raise ValueError(f"{path!r} holds a NUL character, which no file name can; allowed: a "
                             f"{SUFFIX_WORDS} file")
        return path

    def label(self) -> str:
        return f"file({Path(self.path).name},bs{self.block_size})"

    def load(self) -> torch.Tensor:
        """The saved pattern as a bool tensor; ValueError naming the file on any problem."""
        path = Path(self.path)
        _check_regular_file(path)
        if path.suffix.lower() not in SUFFIXES:  # MASK.NPY is as much a .npy file as mask.npy
            raise ValueError(f"pattern file {path}: expected a .npy or .pt file; allowed suffixes: "
                             f"{', '.join(SUFFIXES)} (in any case)")
        try:
            if path.suffix.lower() == ".npy":
                data = np.load(path, allow_pickle=False)
            else:
                data = torch.load(path, map_location="cpu", weights_only=True)
        # A damaged or foreign file fails in the loaders' own ways (UnpicklingError, EOFError,
        # RuntimeError, OSError, ValueError for pickled objects, ...): one message for all.
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"pattern file {path} cannot be read as a {path.suffix} pattern "
                             f"({_reason(exc)})") from exc
        if isinstance(data, torch.Tensor):
            data = _tensor_values(data, path)
        if not isinstance(data, np.ndarray):
            raise ValueError(f"pattern file {path} holds a {type(data).__name__}, not an array")
        _check_zeros_and_ones(data, path)
        return torch.from_numpy(data.astype(bool))

    def layout(self, heads: int, kv_heads: int, seqlen: int, causal: bool) -> BlockLayout:
        return BlockLayout.from_pattern(self.load(), self.block_size, causal,
                                        description=self.label(), warn_kv_cache=False)


SUFFIXES = (".npy", ".pt", ".pth")
SUFFIX_WORDS = ".npy, .pt or .pth"


def _check_regular_file(path: Path) -> None:
    """ValueError naming ``path`` unless it is a regular file: a directory has no pattern, and a
    FIFO or a device would block the load or never end (as a spec file would, see `load_spec`)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"pattern file {path} does not exist") from None
    except OSError as exc:  # a name too long, a folder we may not enter, ...
        raise ValueError(f"pattern file {path} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"pattern file {path} is a directory; allowed: a {SUFFIX_WORDS} file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"pattern file {path} is not a regular file (a FIFO, socket or device); "
                         f"allowed: a {SUFFIX_WORDS} file")


def _tensor_values(data: torch.Tensor, path: Path) -> np.ndarray:
    """A loaded tensor's values as an array; ValueError naming ``path`` for one that has none
    (a sparse, meta or quantized tensor) or holds fractions."""
    if data.layout != torch.strided:
        raise ValueError(f"pattern file {path} holds a {data.layout} tensor; save it dense")
    if data.dtype.is_floating_point or data.dtype.is_complex:
        raise ValueError(f"pattern file {path} holds {data.dtype} values; a pattern is "
                         "bool or integer 0/1")
    try:
        return data.detach().cpu().numpy()
    # A meta tensor has no values to copy; a quantized one has no numpy dtype.
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        raise ValueError(f"pattern file {path} holds a {data.dtype} tensor on {data.device} with "
                         f"no array of values ({_reason(exc)}); a pattern is a dense bool or "
                         "integer 0/1 tensor saved with its values") from exc


def _reason(exc: Exception) -> str:
    """A loader's exception in one line: torch's weights-only refusal is a page of advice with
    terminal colours, whose one useful line names the object it would not unpickle."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    text = text.partition("WeightsUnpickler error:")[2] or text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first = re.split(r"(?<=\.)\s", lines[0])[0]  # its first sentence
    return f"{type(exc).__name__}: {first[:200]}"


def _check_zeros_and_ones(data: np.ndarray, path: Path) -> None:
    """ValueError naming ``path`` unless ``data`` is bool, or integers that are all 0 or 1."""
    if data.dtype == bool:
        return
    if data.dtype.kind not in "iu":
        raise ValueError(f"pattern file {path} holds {data.dtype} values; a pattern is bool or "
                         "integer 0/1")
    bad = data[(data != 0) & (data != 1)]
    if bad.size:
        raise ValueError(f"pattern file {path} holds the value {bad.flat[0]}; a pattern holds "
                         "only 0 and 1")


PatternSpec = Annotated[Union[LocalStridePattern, DensePattern, RandomPattern, FilePattern],
                        Field(discriminator="type")]
PATTERN_TYPES = ("local_stride", "dense", "random", "file")
