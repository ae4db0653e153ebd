"""Pattern entries of a sweep spec, and how each becomes a `BlockLayout` for a case."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from kernels import BlockLayout, local_stride_layout
from kernels.layout import dense_layout, random_layout


class _Pattern(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    block_size: int = 64

    def label(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def layout(self, heads: int, kv_heads: int, seqlen: int, causal: bool) -> BlockLayout:
        raise NotImplementedError  # pragma: no cover


class LocalStridePattern(_Pattern):
    """phi-3-small's local-stride pattern (see `kernels.local_stride_layout`)."""

    type: Literal["local_stride"]
    local_blocks: int = Field(16, ge=1)
    vert_stride: int = Field(8, ge=1)
    homo_head: bool = False
    per_kv_group: bool = False  # one pattern per GQA group instead of one per query head
    head_sliding_step: int | None = Field(None, ge=0)
    head_sliding_offset: int = 0
    num_dense_heads: int = Field(0, ge=0)

    def label(self) -> str:
        heads = "homo" if self.homo_head else ("group" if self.per_kv_group else "head")
        extra = f",dense{self.num_dense_heads}" if self.num_dense_heads else ""
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
    density: float = Field(gt=0.0, le=1.0)
    seed: int = 0
    per_head: bool = True

    def label(self) -> str:
        return f"random(bs{self.block_size},d{self.density},seed{self.seed})"

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

    def label(self) -> str:
        return f"file({Path(self.path).name},bs{self.block_size})"

    def load(self) -> torch.Tensor:
        path = Path(self.path)
        if not path.exists():
            raise ValueError(f"pattern file {path} does not exist")
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if path.suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, torch.Tensor):
                raise ValueError(f"pattern file {path} holds a {type(data).__name__}, not a tensor")
            return data
        raise ValueError(f"pattern file {path}: expected a .npy or .pt file")

    def layout(self, heads: int, kv_heads: int, seqlen: int, causal: bool) -> BlockLayout:
        return BlockLayout.from_pattern(self.load(), self.block_size, causal,
                                        description=self.label(), warn_kv_cache=False)


PatternSpec = Annotated[Union[LocalStridePattern, DensePattern, RandomPattern, FilePattern],
                        Field(discriminator="type")]
PATTERN_TYPES = ("local_stride", "dense", "random", "file")
