"""Block-sparse attention patterns: generators, validation and the index forms the kernels read.

A pattern is a boolean tensor ``(pattern_heads, q_blocks, k_blocks)``: entry ``[h, i, j]`` says
whether the queries of block ``i`` attend to the keys of block ``j`` in head ``h``. ``pattern_heads``
is 1 (every head the same), the number of kv heads (one pattern per GQA group) or the number of
query heads. Block positions are absolute: query block ``i`` covers tokens ``[i*B, (i+1)*B)`` of the
full key sequence, also when fewer queries than keys are given (queries are the last positions).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch

MIN_BLOCK_SIZE = 16
# The largest vert_stride local_stride_layout takes: its stripes' int64 sums stay below 2**63.
MAX_VERT_STRIDE = 2**62
# The most blocks a side of a generated layout: its index forms (to_csr, to_csc) count one head's
# kept blocks in int32, and a head may keep every block (a dense head, a bidirectional pattern),
# so blocks * blocks must fit in an int32. 46340 blocks: 741,440 tokens at block_size 16.
MAX_NUM_BLOCKS = math.isqrt(torch.iinfo(torch.int32).max)


class KVCacheUnfriendlyWarning(UserWarning):
    """A later query block needs a kv block that an earlier query block dropped."""


def check_device(name: str, t: torch.Tensor) -> None:
    """Patterns and index tensors are read on the host or a GPU: a meta (or other) tensor has no
    values to build index forms from."""
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}; it must be on the CPU or a CUDA device")


def _check_flag(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _check_pattern_storage(pattern: torch.Tensor) -> None:
    # A sparse (or other non-strided) tensor has no dense values for ``~``, slicing and nonzero.
    if pattern.layout != torch.strided:
        raise TypeError(f"pattern must be a dense (strided) tensor, got {pattern.layout}; "
                        "call .to_dense() first")


def _check_3d(pattern: torch.Tensor) -> None:
    if pattern.dim() != 3:
        raise ValueError(f"pattern must be 3-D (heads, q_blocks, k_blocks), got shape "
                         f"{tuple(pattern.shape)}")


def _check_description(description: str) -> None:
    if not isinstance(description, str):
        raise TypeError(f"description must be a str, got {type(description).__name__} "
                        f"{description!r}")


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: int, low: int | None = None) -> None:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_block_size(block_size: int, name: str = "block_size") -> None:
    # numpy ints pass, as they do for every other count; the constructors store int(block_size).
    if not is_int(block_size):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK_SIZE}, got {block_size}")


@dataclass(eq=False)
class BlockLayout:
    """A validated block pattern plus the index forms built from it (cached per layout object).

    Build one with :func:`local_stride_layout`, :func:`dense_layout` or :meth:`from_pattern`.
    Built directly, it takes a bool ``(heads, q_blocks, k_blocks)`` pattern on the CPU or a GPU
    and checks only that (no values: :meth:`from_pattern` checks diagonals and empty rows).
    """

    pattern: torch.Tensor  # bool (pattern_heads, q_blocks, k_blocks)
    block_size: int
    causal: bool
    description: str = "custom"
    _plans: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Metadata only (no values read, so no sync for a copy on a GPU): the kernels' index
        # forms use ``~`` and boolean indexing, which an integer pattern turns into wrong
        # results. from_pattern also checks the values (diagonals, empty rows).
        if not isinstance(self.pattern, torch.Tensor):
            raise TypeError(f"pattern must be a torch.Tensor, got {type(self.pattern).__name__}")
        if self.pattern.dtype != torch.bool or self.pattern.dim() != 3:
            raise TypeError(f"BlockLayout needs a bool pattern (heads, q_blocks, k_blocks), got "
                            f"{self.pattern.dtype} {tuple(self.pattern.shape)}; "
                            "BlockLayout.from_pattern takes integer 0/1 and 2-D patterns")
        _check_pattern_storage(self.pattern)
        if 0 in self.pattern.shape:
            raise ValueError(f"pattern must not be empty, got shape {tuple(self.pattern.shape)}")
        check_device("pattern", self.pattern)
        check_block_size(self.block_size)
        self.block_size = int(self.block_size)  # a numpy int would reach the kernels' constexprs
        _check_flag("causal", self.causal)
        _check_description(self.description)

    @classmethod
    def from_pattern(cls, pattern: torch.Tensor, block_size: int, causal: bool = True,
                     description: str = "custom", warn_kv_cache: bool = True) -> "BlockLayout":
        """Validate a user pattern ``(heads or 1, q_blocks, k_blocks)`` (or 2-D for one head)."""
        check_block_size(block_size)
        _check_flag("causal", causal)
        _check_flag("warn_kv_cache", warn_kv_cache)
        _check_description(description)
        if not isinstance(pattern, torch.Tensor):
            raise TypeError(f"pattern must be a torch.Tensor, got {type(pattern).__name__}")
        _check_pattern_storage(pattern)
        check_device("pattern", pattern)
        if pattern.dim() == 2:
            pattern = pattern[None]
        if pattern.dim() != 3:
            raise ValueError(
                f"pattern must have shape (heads or 1, q_blocks, k_blocks), got {tuple(pattern.shape)}")
        if pattern.dtype.is_floating_point or pattern.dtype.is_complex:
            raise TypeError(f"pattern must be bool or integer 0/1, got {pattern.dtype}")
        if pattern.dtype != torch.bool:
            # A 2 or -1 is more likely a count or a -1 padding than a kept block: refuse it.
            bad = pattern[(pattern != 0) & (pattern != 1)]
            if bad.numel():
                raise ValueError(f"pattern must hold only 0 and 1, got {bad[0].item()} "
                                 f"({bad.numel()} entries neither 0 nor 1)")
        pattern = pattern != 0
        h, qb, kb = pattern.shape
        if h == 0 or qb == 0 or kb == 0:
            raise ValueError(f"pattern must not be empty, got shape {tuple(pattern.shape)}")
        if causal:
            if qb > kb:
                raise ValueError(
                    f"a causal pattern needs q_blocks <= k_blocks, got shape {tuple(pattern.shape)}")
            diag = pattern.diagonal(dim1=1, dim2=2)
            if not bool(diag.all()):
                hh, ii = (~diag).nonzero()[0].tolist()
                raise ValueError(
                    f"pattern: every causal row must keep its diagonal block; head {hh} drops "
                    f"block ({ii}, {ii})")
            upper = torch.ones(qb, kb, dtype=torch.bool, device=pattern.device).triu(1)
            if bool((pattern & upper).any()):
                # Blocks above the diagonal are masked anyway; drop them so the kernel skips them.
                pattern = pattern & ~upper
        else:
            empty = ~pattern.any(dim=2)
            if bool(empty.any()):
                hh, ii = empty.nonzero()[0].tolist()
                raise ValueError(f"pattern: head {hh}, query block {ii} keeps no kv block")
        layout = cls(pattern.contiguous(), block_size, causal, description)
        if warn_kv_cache and causal and not is_kv_cache_friendly(layout.pattern):
            warnings.warn(
                "pattern is not KV-cache friendly: a later query block needs a kv block that an "
                "earlier query block dropped, so a KV cache must keep blocks that look unused",
                KVCacheUnfriendlyWarning, stacklevel=2)
        return layout

    # -- shape --
    @property
    def heads(self) -> int:
        return self.pattern.shape[0]

    @property
    def q_blocks(self) -> int:
        return self.pattern.shape[1]

    @property
    def k_blocks(self) -> int:
        return self.pattern.shape[2]

    @property
    def max_seqlen(self) -> int:
        """The longest key length :meth:`check_seqlen` takes: query blocks are absolute too, so
        a pattern with fewer query than kv blocks covers only its query blocks' tokens."""
        return min(self.q_blocks, self.k_blocks) * self.block_size

    def to(self, device: torch.device | str | int) -> "BlockLayout":
        """This layout on another device; the copy (and so its index forms) is kept and reused."""
        if not isinstance(device, (torch.device, str)) and not is_int(device):
            raise TypeError(f"device must be a torch.device, a str or an int, got "
                            f"{type(device).__name__} {device!r}")
        if is_int(device):
            # An index names a CUDA device (the one accelerator the kernels run on); torch's
            # own reading of it fails with a RuntimeError where no accelerator is present.
            _check_int("device", device, 0)
            device = torch.device("cuda", int(device))
        try:
            device = torch.device(device)
        except RuntimeError as exc:  # torch refuses a bad device string with a RuntimeError
            raise ValueError(f"device {device!r} is not a device torch knows ({exc})") from exc
        if device.type == "cpu":
            device = torch.device("cpu")  # "cpu:0" is the one CPU device, as torch stores it
        elif device.type == "cuda" and not torch.cuda.is_available():
            # torch's own failure here is an AssertionError ("not compiled with CUDA").
            raise ValueError(f"device {device} is not available: torch.cuda.is_available() is "
                             "False")
        elif device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.pattern.device == device:
            return self
        return self.cached(("to", str(device)), lambda: BlockLayout(
            self.pattern.to(device), self.block_size, self.causal, self.description))

    def hash(self) -> str:
        """A short content hash (pattern bits, block size, causality) for provenance and caching."""
        if "hash" not in self._plans:
            h = hashlib.sha256()
            h.update(f"{tuple(self.pattern.shape)}|{self.block_size}|{self.causal}".encode())
            h.update(self.pattern.cpu().numpy().tobytes())
            self._plans["hash"] = h.hexdigest()[:12]
        return self._plans["hash"]

    def check_seqlen(self, seq_k: int, seq_q: int | None = None) -> None:
        """Raise ValueError unless the pattern covers ``seq_k`` keys and ``seq_q`` <= ``seq_k``
        (TypeError for a length that is not an int)."""
        seq_q = seq_k if seq_q is None else seq_q
        # A float (or bool) length would pass the comparisons below and break token_mask's
        # indexing; a str or None would fail inside them.
        _check_int("seq_k", seq_k)
        _check_int("seq_q", seq_q)
        if seq_k < 1 or seq_q < 1:
            raise ValueError(f"sequence lengths must be >= 1, got q={seq_q}, k={seq_k}")
        if seq_q > seq_k:
            raise ValueError(
                f"query length must be <= key length (queries are the last positions), "
                f"got {seq_q} > {seq_k}")
        need = math.ceil(seq_k / self.block_size)
        if need > self.k_blocks or need > self.q_blocks:
            raise ValueError(
                f"the pattern covers {self.q_blocks}x{self.k_blocks} blocks of {self.block_size} "
                f"tokens, too few for key length {seq_k} ({need} blocks needed)")

    def density(self, seq_k: int, seq_q: int | None = None) -> float:
        """Share of the (causal, if causal) token pairs the pattern keeps, for these lengths."""
        seq_q = seq_k if seq_q is None else seq_q
        self.check_seqlen(seq_k, seq_q)  # first, so that its errors name the lengths
        total = causal_pairs(seq_q, seq_k) if self.causal else seq_q * seq_k
        return kept_pairs(self, seq_k, seq_q) / total

    def cached(self, key: tuple, build) -> object:
        """Memoise an index form built from this layout (kernels call this with their own keys)."""
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]


def _check_layout(layout: BlockLayout) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")


def causal_pairs(seq_q: int, seq_k: int) -> int:
    """Number of (query, key) pairs with key <= query when queries are the last seq_q positions."""
    # More queries than keys has no such placement: the offset would go negative.
    _check_int("seq_q", seq_q, 0)
    _check_int("seq_k", seq_k, 0)
    if seq_q > seq_k:
        raise ValueError(f"seq_q must be <= seq_k (queries are the last positions), got "
                         f"{seq_q} > {seq_k}")
    offset = seq_k - seq_q
    return seq_q * (offset + 1) + seq_q * (seq_q - 1) // 2


def kept_pairs(layout: BlockLayout, seq_k: int, seq_q: int | None = None) -> float:
    """Mean over pattern heads of the (query, key) token pairs the pattern keeps, causal mask
    included, counted per block without building the token mask (cheap at any length)."""
    _check_layout(layout)
    seq_q = seq_k if seq_q is None else seq_q
    layout.check_seqlen(seq_k, seq_q)
    bs, nb = layout.block_size, math.ceil(seq_k / layout.block_size)
    offset = seq_k - seq_q
    starts = torch.arange(nb, dtype=torch.float64) * bs
    ends = torch.clamp(starts + bs, max=seq_k)
    q_lo = torch.clamp(starts, min=offset)
    rows = torch.clamp(ends - q_lo, min=0)  # query positions per block
    cols = ends - starts  # keys per block
    pairs = rows[:, None] * cols[None, :]
    if layout.causal:
        # Diagonal block: query p sees keys start..p, so sum over p in [q_lo, end) of (p - start + 1).
        first, last = q_lo - starts + 1, ends - starts
        diag = torch.where(rows > 0, (first + last) * rows / 2, torch.zeros_like(rows))
        pairs = pairs.tril(-1) + torch.diag(diag)
    kept = layout.pattern[:, :nb, :nb].to(torch.float64).cpu()
    return float((kept * pairs).sum(dim=(1, 2)).mean())


def token_mask(layout: BlockLayout, seq_k: int, seq_q: int | None = None) -> torch.Tensor:
    """The token-level bool mask ``(pattern_heads, seq_q, seq_k)``, causal mask included."""
    _check_layout(layout)
    seq_q = seq_k if seq_q is None else seq_q
    layout.check_seqlen(seq_k, seq_q)
    bs = layout.block_size
    offset = seq_k - seq_q
    q_pos = torch.arange(offset, offset + seq_q, device=layout.pattern.device)
    k_pos = torch.arange(seq_k, device=layout.pattern.device)
    mask = layout.pattern[:, q_pos // bs][:, :, k_pos // bs]
    if layout.causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])
    return mask


def is_kv_cache_friendly(pattern: torch.Tensor) -> bool:
    """True when no later query block needs an off-diagonal kv block an earlier one dropped."""
    _check_3d(pattern)
    p = pattern.to(torch.int8)
    qb, kb = p.shape[1], p.shape[2]
    # Only kv block j < i-1 counts: block i-1 may be the previous row's own diagonal.
    below = (torch.arange(1, qb, device=p.device)[:, None] > torch.arange(kb, device=p.device) + 1)
    gained = (p[:, 1:] - p[:, :-1]) > 0
    return not bool((gained & below).any())


def _check_num_blocks(num_blocks: int) -> None:
    if num_blocks > MAX_NUM_BLOCKS:
        raise ValueError(f"num_blocks must be at most {MAX_NUM_BLOCKS} (a head's kept blocks, "
                         f"up to num_blocks**2, are counted in int32), got {num_blocks}")


def dense_layout(num_blocks: int, block_size: int, causal: bool = True) -> BlockLayout:
    """Every block kept (the lower triangle when causal); ``num_blocks`` at most
    :data:`MAX_NUM_BLOCKS`."""
    check_block_size(block_size)
    _check_int("num_blocks", num_blocks, 1)
    _check_num_blocks(num_blocks)
    _check_flag("causal", causal)
    pattern = torch.ones(1, num_blocks, num_blocks, dtype=torch.bool)
    if causal:
        pattern = pattern.tril()
    return BlockLayout(pattern, block_size, causal, f"dense(bs={int(block_size)})")


def local_stride_layout(num_heads: int, max_seq_len: int, block_size: int, local_blocks: int,
                        vert_stride: int, *, homo_head: bool = False, num_kv_heads: int | None = None,
                        head_sliding_step: int | None = None, head_sliding_offset: int = 0,
                        num_dense_heads: int = 0, causal: bool = True) -> BlockLayout:
    """The local-stride pattern of phi-3-small.

    Query block ``i`` keeps kv block ``j`` when it is within ``local_blocks`` of ``i`` (below it
    when causal, on both sides otherwise) or when it is a vertical block of its head:
    ``(j + h*head_sliding_step + head_sliding_offset) % vert_stride == 0`` with ``j`` absolute
    when causal, and with ``j`` replaced by the relative position ``i - j`` when bidirectional.

    Pattern heads: 1 with ``homo_head``; ``num_kv_heads`` when given (one pattern per GQA group);
    else ``num_heads`` (one per query head). The last ``num_dense_heads`` pattern heads are dense.
    ``head_sliding_step`` defaults to ``max(1, vert_stride // num_heads)``. ``max_seq_len`` may
    span at most :data:`MAX_NUM_BLOCKS` blocks.
    """
    check_block_size(block_size)
    for name, value in (("num_heads", num_heads), ("max_seq_len", max_seq_len),
                        ("local_blocks", local_blocks), ("vert_stride", vert_stride)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    # Only these two default to None; head_sliding_offset and num_dense_heads are ints.
    for name, value in (("num_kv_heads", num_kv_heads), ("head_sliding_step", head_sliding_step)):
        if value is not None:
            _check_int(name, value)
    _check_int("head_sliding_offset", head_sliding_offset)
    _check_int("num_dense_heads", num_dense_heads)
    _check_flag("homo_head", homo_head)
    _check_flag("causal", causal)
    # numpy ints pass the checks; plain ints keep the description and arithmetic plain.
    num_heads, max_seq_len, block_size = int(num_heads), int(max_seq_len), int(block_size)
    local_blocks, vert_stride = int(local_blocks), int(vert_stride)
    head_sliding_offset, num_dense_heads = int(head_sliding_offset), int(num_dense_heads)
    num_kv_heads = None if num_kv_heads is None else int(num_kv_heads)
    head_sliding_step = None if head_sliding_step is None else int(head_sliding_step)
    if num_kv_heads is not None and (num_kv_heads < 1 or num_heads % num_kv_heads):
        raise ValueError(f"num_kv_heads must divide num_heads={num_heads}, got {num_kv_heads}")
    pattern_heads = 1 if homo_head else (num_kv_heads or num_heads)
    if not 0 <= num_dense_heads <= pattern_heads:
        raise ValueError(f"num_dense_heads must be in [0, {pattern_heads}], got {num_dense_heads}")
    if homo_head and num_dense_heads:
        raise ValueError("num_dense_heads needs heterogeneous heads (homo_head=False)")
    step = max(1, vert_stride // num_heads) if head_sliding_step is None else head_sliding_step
    if vert_stride > MAX_VERT_STRIDE:
        raise ValueError(f"vert_stride must be at most 2**62 blocks, got {vert_stride}")
    blocks = -(-max_seq_len // block_size)  # in ints: a float quotient rounds a huge length
    if blocks > MAX_NUM_BLOCKS:
        raise ValueError(f"max_seq_len must be at most {MAX_NUM_BLOCKS * block_size} at "
                         f"block_size {block_size} ({MAX_NUM_BLOCKS} blocks: a head's kept "
                         f"blocks, up to blocks**2, are counted in int32), got {max_seq_len} "
                         f"({blocks} blocks)")

    i = torch.arange(blocks)[:, None]
    j = torch.arange(blocks)[None, :]
    # Each head's shift modulo vert_stride, in Python ints: the same stripes as h * step +
    # offset, whose int64 product a large step or offset would overflow (a wrong pattern).
    shift = torch.tensor([(hh * step + head_sliding_offset) % vert_stride
                          for hh in range(pattern_heads)])[:, None, None]
    if causal:
        local = (i >= j) & (i - j < local_blocks)
        vertical = ((j + shift) % vert_stride == 0) & (i >= j)
    else:
        local = (i - j).abs() < local_blocks
        vertical = (i - j + shift) % vert_stride == 0
    pattern = local[None] | vertical
    if num_dense_heads:
        full = torch.ones(blocks, blocks, dtype=torch.bool)
        pattern[pattern_heads - num_dense_heads:] = full.tril() if causal else full
    desc = (f"local_stride(bs={block_size},local={local_blocks},stride={vert_stride},"
            f"heads={'homo' if homo_head else pattern_heads},step={step},offset={head_sliding_offset}"
            + (f",dense_heads={num_dense_heads}" if num_dense_heads else "") + ")")
    return BlockLayout(pattern.contiguous(), block_size, causal, desc)


def random_layout(heads: int, num_blocks: int, block_size: int, density: float, seed: int = 0,
                  causal: bool = True) -> BlockLayout:
    """A random pattern keeping about ``density`` of the blocks, diagonal always kept."""
    _check_int("heads", heads, 1)
    _check_int("num_blocks", num_blocks, 1)
    _check_num_blocks(num_blocks)
    _check_int("seed", seed)
    # torch.Generator.manual_seed takes this range and fails with "Overflow" outside it.
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be in [{-2**63}, {2**64 - 1}], got {seed}")
    # A bool is no density (True read as 1.0); a str or None failed inside the comparison.
    if (isinstance(density, torch.Tensor) and density.numel() == 1
            and density.dtype.is_floating_point):
        density = density.item()
    if not isinstance(density, numbers.Real) or isinstance(density, bool):
        raise TypeError(f"density must be a real number, got {type(density).__name__} "
                        f"{density!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    check_block_size(block_size)
    _check_flag("causal", causal)
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.rand(heads, num_blocks, num_blocks, generator=gen) < density
    pattern |= torch.eye(num_blocks, dtype=torch.bool)
    if causal:
        pattern &= torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril()
    desc = f"random(bs={block_size},density={density},seed={seed},heads={heads})"
    return BlockLayout.from_pattern(pattern, block_size, causal, desc, warn_kv_cache=False)


# -- index forms --

def to_csr(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept kv blocks per q block: ``row_ptr`` (heads, q_blocks+1) and ``col_idx`` (heads, max_nnz).

    Offsets are per head; ``col_idx`` rows are padded with -1. Both int32.
    """
    _check_3d(pattern)
    counts = pattern.sum(dim=2, dtype=torch.int32)
    row_ptr = torch.zeros(pattern.shape[0], pattern.shape[1] + 1, dtype=torch.int32,
                          device=pattern.device)
    row_ptr[:, 1:] = counts.cumsum(dim=1)
    nnz = row_ptr[:, -1]
    width = int(nnz.max()) if nnz.numel() else 0
    col_idx = torch.full((pattern.shape[0], max(width, 1)), -1, dtype=torch.int32,
                         device=pattern.device)
    hh, _, jj = pattern.nonzero(as_tuple=True)
    # Position of each kept block within its head: running index minus the head's start.
    head_start = torch.zeros(pattern.shape[0], dtype=torch.int64, device=pattern.device)
    head_start[1:] = nnz.cumsum(0)[:-1].to(torch.int64)
    pos = torch.arange(hh.numel(), device=pattern.device) - head_start[hh]
    col_idx[hh, pos] = jj.to(torch.int32)
    return row_ptr, col_idx


def to_csc(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept q blocks per kv block (the backward's dk/dv form), same conventions as :func:`to_csr`."""
    _check_3d(pattern)
    return to_csr(pattern.transpose(1, 2))


def csr(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached :func:`to_csr` of a layout."""
    _check_layout(layout)
    return layout.cached(("csr", layout.pattern.device), lambda: to_csr(layout.pattern))


def csc(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached :func:`to_csc` of a layout."""
    _check_layout(layout)
    return layout.cached(("csc", layout.pattern.device), lambda: to_csc(layout.pattern))
