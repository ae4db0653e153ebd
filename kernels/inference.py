"""Inference API: variable-length and left-padded prefill, chunked prefill, KV-cache decoding
(contiguous or paged caches).

These forms are forward-only (no gradients). Every sequence's block pattern starts at its own
first token. Checks happen here, once, before any launch. Each form has its own kernel record and
config-cache entries: "varlen" (the varlen and padded calls) and "decode".

Engines capture their steps in CUDA graphs, so the varlen and decode calls have a graph-ready
form: what depends only on the batch's shape is built once (:func:`varlen_sequences`, the
sequence table; :func:`decode_workspace`, the outputs and the split count) and passed to every
call, which then reads no tensor back, allocates nothing (varlen: nothing but its output) and
checks only shapes (decode: once per shape, the workspace remembering the checked launch).
"""

from __future__ import annotations

import itertools
import math

import torch

from . import select
from .checks import (
    SUPPORTED_DTYPES,
    check_batch,
    check_config_type,
    check_count,
    check_heads,
    check_inference_only,
    check_same_shape,
    check_scale,
    check_tensors,
)
from .configs import LaunchConfig, check_config
from . import decode, varlen
from .configs import query_tile_problems
from .decode import (
    MAX_SPLITS,
    PAGE_SIZES,
    DecodeLaunch,
    DecodeWorkspace,
    decode_launch,
    decode_splits,
    new_workspace,
    sparse_attention_decode_fwd,
)
from .layout import BlockLayout, check_device, is_int
from .outside_compile import outside_compile
from .varlen import (
    VarlenSequences,
    new_varlen_output,
    sequence_table,
    sparse_attention_fwd_varlen,
)


# The largest row or length an int32 table (the varlen sequence table) holds.
INT32_MAX = torch.iinfo(torch.int32).max
# Query heads per kv head a decoding step serves: the group plan's head bits are one int32.
MAX_GROUP = 31


def check_group(heads: int, kv_heads: int) -> None:
    """ValueError unless a decoding step can serve ``heads`` query heads over ``kv_heads``:
    checked by the step, its workspace and the group plan alike."""
    if heads // kv_heads > MAX_GROUP:
        raise ValueError(f"decoding supports at most {MAX_GROUP} query heads per kv head, got "
                         f"{heads} heads for kv_heads={kv_heads}")


def _check_common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                  ranks: int, sm_scale: float | None, names: tuple[str, str, str] = ("q", "k", "v"),
                  shape_hint: str = "") -> None:
    check_tensors(names, (q, k, v), ranks, shape_hint)
    check_inference_only(names, (q, k, v), "the varlen, padded and decode forms are")
    check_same_shape(names[1:], k, v)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k must have one head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    check_heads(q.shape[-2], k.shape[-2], q.shape[-1], layout)
    check_scale(sm_scale)


def _check_lengths_tensor(name: str, t: torch.Tensor) -> None:
    """``t`` is a 1-D tensor of an integer dtype (bool and complex are not lengths) on a device
    whose values can be read; no value is read here."""
    if not (isinstance(t, torch.Tensor) and t.dim() == 1 and not t.dtype.is_floating_point
            and not t.dtype.is_complex and t.dtype != torch.bool):
        got = (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise TypeError(f"{name} must be a 1-D integer tensor, got {got}")
    check_device(name, t)


def _lengths(name: str, t: torch.Tensor) -> list[int]:
    _check_lengths_tensor(name, t)
    return [int(x) for x in t.tolist()]


def resolve_varlen_config(probe: torch.Tensor, layout: BlockLayout,
                          seq_k: int) -> tuple[LaunchConfig, str]:
    """The launch config a varlen or padded call runs when none is given, and where it came from:
    :func:`kernels.select.resolve_config` for the "varlen" kernel (its own cache entries, its
    own Triton default). ``probe`` carries the device, dtype and head_dim."""
    # Checked here, as it is public: the lookup would fail on a weak reference (a layout that
    # is not one) or divide by zero (no keys), and a pattern too short would still get a config.
    if not isinstance(probe, torch.Tensor):
        raise TypeError(f"probe must be a torch.Tensor (its device, dtype and head_dim are "
                        f"looked up), got {type(probe).__name__}")
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if not is_int(seq_k):
        raise TypeError(f"seq_k must be an int, got {type(seq_k).__name__}")
    layout.check_seqlen(seq_k)
    return select.resolve_config("varlen", probe, layout, seq_k)


def _config(q: torch.Tensor, layout: BlockLayout, seq_k: int, config: LaunchConfig | None,
            dim: int) -> LaunchConfig:
    check_config_type("config", config)
    if config is None:
        # q itself carries what the lookup reads (device, dtype, head_dim): no probe allocated.
        config = resolve_varlen_config(q, layout, seq_k)[0]
    elif config.impl != "triton":
        raise ValueError(f"config {config.short()}: varlen and padded calls run the Triton "
                         "kernel; give a config with impl='triton'")
    check_config(config, layout.block_size, dim, "varlen")
    return config


def _check_lengths(q_lens: list[int], k_lens: list[int]) -> None:
    for i, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        if ql < 1 or kl < 1:
            raise ValueError(f"sequence {i} has length {ql} (queries) / {kl} (keys); zero-length "
                             "sequences are not allowed: leave them out of the batch")
        if ql > kl:
            raise ValueError(f"sequence {i}: {ql} queries but {kl} keys; queries are the last "
                             "positions of their sequence (chunked prefill), so q_len <= k_len")


def varlen_sequences(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     device: torch.device | str | None = None) -> VarlenSequences:
    """The sequence table of a packed batch, built once per batch shape: ``cu_seqlens_q/k`` (int
    ``(num_seqs + 1,)``, cumulative lengths from 0) read back and checked, and the table copied
    to ``device`` (None: cu_seqlens_q's), where q, k and v must live.

    Pass it as ``sequences=`` to every :func:`sparse_attention_varlen` call of that batch: such a
    call reads nothing back from the device and allocates only its output, so it can be
    captured in a CUDA graph (and replayed on new q, k, v of the same lengths).
    """
    cq, ck = _lengths("cu_seqlens_q", cu_seqlens_q), _lengths("cu_seqlens_k", cu_seqlens_k)
    if len(cq) != len(ck) or len(cq) < 2:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have num_seqs + 1 >= 2 entries, "
                         f"got {len(cq)} and {len(ck)}")
    if cq[0] != 0 or ck[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed lengths, got q: "
                         f"{cq[0]}..{cq[-1]}, k: {ck[0]}..{ck[-1]}")
    for name, cu in (("cu_seqlens_q", cq), ("cu_seqlens_k", ck)):
        drop = next((i for i in range(1, len(cu)) if cu[i] < cu[i - 1]), None)
        if drop is not None:
            raise ValueError(f"{name} must be non-decreasing (cumulative lengths), got "
                             f"{cu[drop - 1]} then {cu[drop]} at entries {drop - 1}, {drop}")
    for name, cu in (("cu_seqlens_q", cq), ("cu_seqlens_k", ck)):
        if cu[-1] > INT32_MAX:
            raise ValueError(f"{name} ends at {cu[-1]}, past {INT32_MAX}: the kernel's sequence "
                             "table holds int32 rows")
    q_lens = [b - a for a, b in itertools.pairwise(cq)]
    k_lens = [b - a for a, b in itertools.pairwise(ck)]
    _check_lengths(q_lens, k_lens)
    device = cu_seqlens_q.device if device is None else _table_device(device)
    return sequence_table([0] * len(q_lens), cq[:-1], q_lens, ck[:-1], k_lens, device)


def _table_device(device: torch.device | str | int) -> torch.device:
    """varlen_sequences' ``device`` (where q, k and v must live) as torch names it, refused
    here when torch would fail on it with its own words (a RuntimeError, an AssertionError)."""
    if not isinstance(device, (torch.device, str)) and not is_int(device):
        raise TypeError(f"device must be a torch.device, a str, an int or None, got "
                        f"{type(device).__name__} {device!r}")
    if is_int(device):
        if device < 0:
            raise ValueError(f"device must be a CUDA device index >= 0, got {device}")
        device = torch.device("cuda", int(device))
    try:
        device = torch.device(device)
    except RuntimeError as exc:  # torch refuses a bad device string with a RuntimeError
        raise ValueError(f"device {device!r} is not a device torch knows ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} is not available: torch.cuda.is_available() is False")
    return device


@outside_compile
def sparse_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                            layout: BlockLayout, sm_scale: float | None = None,
                            config: LaunchConfig | None = None, *,
                            sequences: VarlenSequences | None = None) -> torch.Tensor:
    """Packed variable-length sequences, as FlashAttention's varlen API takes them.

    q: ``(total_q, heads, dim)``; k, v: ``(total_k, kv_heads, dim)``; ``cu_seqlens_q/k``: int
    ``(num_seqs + 1,)`` cumulative lengths starting at 0. Sequence ``i``'s queries are the last
    ``q_len_i`` of its ``k_len_i`` positions, so chunked prefill of several sequences is one call.
    Returns ``(total_q, heads, dim)``.

    ``sequences`` (:func:`varlen_sequences` of these cu_seqlens, made once per batch shape)
    spares the call reading cu_seqlens back (a sync) and building the table: it must come from
    the same lengths, which are checked where cu_seqlens are on the host (on a GPU only their
    count is).
    """
    _check_common(q, k, v, layout, 3, sm_scale, shape_hint="(total, heads, dim)")
    seqs = _packed_sequences(q, k, cu_seqlens_q, cu_seqlens_k, sequences)
    layout.check_seqlen(seqs.max_k)
    layout = layout.to(q.device)
    dim = q.shape[-1]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    cfg = _config(q, layout, seqs.max_k, config, dim)
    q4, k4, v4 = q[None], k[None], v[None]
    out = new_varlen_output(q4, padded=False)
    return sparse_attention_fwd_varlen(q4, k4, v4, seqs, layout, scale, cfg, out)[0]


def _packed_sequences(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor,
                      sequences: VarlenSequences | None) -> VarlenSequences:
    """The call's sequence table, given or built, checked against the packed tensors."""
    given = sequences is not None
    if sequences is None:
        sequences = varlen_sequences(cu_seqlens_q, cu_seqlens_k, q.device)
    elif not isinstance(sequences, VarlenSequences):
        raise TypeError(f"sequences must be a VarlenSequences (kernels.varlen_sequences), got "
                        f"{type(sequences).__name__}")
    elif sequences.meta.device != q.device:
        raise ValueError(f"sequences' table is on {sequences.meta.device}, q on {q.device}; make "
                         "it with varlen_sequences(..., device=q.device)")
    else:
        # Shapes only (reading the values back is what a table spares): a table of another
        # batch's sequence count is caught here.
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if isinstance(cu, torch.Tensor) and tuple(cu.shape) != (sequences.count + 1,):
                raise ValueError(f"sequences holds {sequences.count} sequences, but {name} has "
                                 f"shape {tuple(cu.shape)}, not ({sequences.count + 1},); make "
                                 "the table from these cu_seqlens")
    if sequences.rows_q != q.shape[0] or sequences.rows_k != k.shape[0]:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed lengths "
                         f"(q: {q.shape[0]}, k: {k.shape[0]}), got q: 0..{sequences.rows_q}, "
                         f"k: 0..{sequences.rows_k}")
    if given:
        _check_table_lengths(sequences, cu_seqlens_q, cu_seqlens_k)
    return sequences


def _check_table_lengths(sequences: VarlenSequences, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor) -> None:
    """A given table's lengths against host cu_seqlens, which cost nothing to read (on a GPU
    they would cost a sync, so there only their count is checked)."""
    for name, cu, lens in (("cu_seqlens_q", cu_seqlens_q, sequences.q_lens),
                           ("cu_seqlens_k", cu_seqlens_k, sequences.k_lens)):
        if not isinstance(cu, torch.Tensor) or cu.device.type != "cpu":
            continue
        got = (cu[1:] - cu[:-1]).tolist()
        wrong = [i for i, (a, b) in enumerate(zip(got, lens)) if a != b]
        if wrong:
            i = wrong[0]
            raise ValueError(f"sequences was made from other lengths than {name}: sequence {i} "
                             f"is {lens[i]} long in the table and {got[i]} in {name}; make the "
                             "table from these cu_seqlens")


@outside_compile
def sparse_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            seq_lens: torch.Tensor, layout: BlockLayout,
                            sm_scale: float | None = None,
                            config: LaunchConfig | None = None) -> torch.Tensor:
    """A left-padded batch: sequence ``b`` occupies the last ``seq_lens[b]`` positions.

    q: ``(batch, seq, heads, dim)``; k, v: ``(batch, seq, kv_heads, dim)``. Each sequence's pattern
    starts at its first real token (not at the padding). Padded output rows are zero.
    """
    _check_common(q, k, v, layout, 4, sm_scale, shape_hint="(batch, seq, heads, dim)")
    check_batch("q", q.shape[0])
    lens = _lengths("seq_lens", seq_lens)
    batch, seq = q.shape[0], q.shape[1]
    if k.shape[0] != batch or k.shape[1] != seq:
        raise ValueError(f"q and k must have one (batch, seq), got {tuple(q.shape[:2])} and "
                         f"{tuple(k.shape[:2])}")
    if len(lens) != batch:
        raise ValueError(f"seq_lens has {len(lens)} entries for a batch of {batch}")
    if max(lens) > seq:
        raise ValueError(f"seq_lens has {max(lens)}, longer than the padded length {seq}")
    _check_lengths(lens, lens)
    layout.check_seqlen(max(lens))
    pads = [seq - n for n in lens]
    seqs = sequence_table(list(range(batch)), pads, lens, pads, lens, q.device)
    layout = layout.to(q.device)
    dim = q.shape[-1]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    cfg = _config(q, layout, seqs.max_k, config, dim)
    out = new_varlen_output(q, padded=True)
    return sparse_attention_fwd_varlen(q, k, v, seqs, layout, scale, cfg, out)


@outside_compile
def sparse_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, layout: BlockLayout,
                            sm_scale: float | None = None, num_splits: int | None = None,
                            config: LaunchConfig | None = None, *,
                            block_table: torch.Tensor | None = None,
                            max_cache_len: int | None = None,
                            workspace: DecodeWorkspace | None = None) -> torch.Tensor:
    """One decoding step with a KV cache.

    q: ``(batch, heads, dim)``, the newest token of each sequence; k_cache, v_cache:
    ``(batch, max_len, kv_heads, dim)``, already holding that token's k/v at position
    ``cache_seqlens[b] - 1``. Paged, with ``block_table`` (int32 ``(batch, max_pages)``, as
    FlashAttention's ``block_table`` and FA4's ``page_table``): the caches are
    ``(num_pages, page_size, kv_heads, dim)`` pages (vLLM's, FlashInfer's NHD layout), page size a
    power of two from 16 to 256, and position ``p`` of sequence ``b`` is row ``p % page_size``
    of page ``block_table[b, p // page_size]``; entries past a sequence's last page are not read.
    The pattern applies by absolute position in either form.

    Lengths must lie in ``[1, max_cache_len]``; ``max_cache_len`` (a Python int, the longest a
    cache may grow) defaults to the caches' capacity, ``max_len`` or ``max_pages * page_size``,
    and the pattern must cover it. The pattern row of the new token's position decides which
    cached blocks are read. ``num_splits`` (split-K over kept blocks) is chosen once per batch
    shape to fill the GPU unless given; one split runs one kernel that writes the output itself
    (no partials, no merge). ``config`` overrides the launch config the lookup would pick for
    the "decode" kernel (``block_n`` keys per step, ``num_warps``, ``num_stages``; ``block_m``
    is always 16).

    ``workspace`` (:func:`decode_workspace`, made once per batch shape) makes the step
    graph-ready: the call allocates nothing, converts nothing (``cache_seqlens`` must be
    contiguous int32 on q's device) and reads no tensor's values, so it can be captured in a CUDA
    graph and replayed with new queries, cache contents, lengths and pages. It returns
    ``workspace.out``, overwritten by each call. Lengths and pages are then the caller's to keep
    in range (as FlashAttention's kvcache API leaves them), even on the CPU, and the workspace
    checks each differently shaped call once: a later call whose tensors have the same shapes,
    strides, dtypes and devices, with the same other arguments (a tensor ``sm_scale`` is read
    and checked every call), launches at once. Without a workspace, lengths and pages held on the
    CPU are checked; on the GPU they are never read back (a sync per step would cost more than
    the step). Returns ``(batch, heads, dim)``.
    """
    key = _call_key(q, k_cache, v_cache, cache_seqlens, block_table, layout, sm_scale,
                    num_splits, config, max_cache_len, workspace)
    if key is not None and (known := workspace.launches.get(key)) is not None:
        return known[0](q, k_cache, v_cache, cache_seqlens, block_table, workspace)
    max_len = _check_decode(q, k_cache, v_cache, cache_seqlens, layout, block_table,
                            max_cache_len, sm_scale, num_splits)
    check_config_type("config", config)
    if workspace is not None:
        _check_workspace(workspace, q, k_cache.shape[2], num_splits)
        if cache_seqlens.dtype != torch.int32 or cache_seqlens.device != q.device:
            raise TypeError(f"with a workspace, cache_seqlens must be int32 on q's device "
                            f"({q.device}), got {cache_seqlens.dtype} on {cache_seqlens.device}: "
                            "a graph-ready step converts nothing")
        # The kernel reads sequence b's length at element b: a strided view would be misread.
        if not cache_seqlens.is_contiguous():
            raise ValueError(f"with a workspace, cache_seqlens must be contiguous, got stride "
                             f"{cache_seqlens.stride()}: a graph-ready step copies nothing")
        lens = cache_seqlens
    else:
        _check_values(cache_seqlens, block_table, k_cache, max_len)
        # A no-op (no copy) for contiguous int32 lengths already on q's device; the kernel reads
        # sequence b's length at element b, so a strided view (a column, an expand) is copied.
        lens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    given_layout, layout = layout, layout.to(q.device)
    dim = q.shape[-1]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    if config is None:
        # Checked by the lookup (a cached config that cannot run here is skipped).
        config = select.resolve_config("decode", q, layout, max_len)[0]
    else:
        check_config(config, layout.block_size, dim, "decode")
    if workspace is None:
        return sparse_attention_decode_fwd(q, k_cache, v_cache, lens, layout, scale, num_splits,
                                           config, block_table=block_table)
    launch = decode_launch(q, k_cache, v_cache, layout, scale, config, block_table, workspace)
    if key is not None:
        _remember(workspace, key, launch, given_layout)
    return launch(q, k_cache, v_cache, lens, block_table, workspace)


# A workspace remembers the launches of this many differently shaped calls at most.
REMEMBERED_LAUNCHES = 8


def _call_key(q, k_cache, v_cache, cache_seqlens, block_table, layout, sm_scale, num_splits,
              config, max_cache_len, workspace) -> tuple | None:
    """Everything the checks of a call with a workspace read: the tensors' shapes, strides,
    dtypes, devices and gradient flags, and the other arguments (the layout by identity; the
    workspace keeps it alive with the launch). None without a workspace, or when an argument is
    not what the checks want (they will say so)."""
    if not isinstance(workspace, DecodeWorkspace) or isinstance(sm_scale, torch.Tensor):
        # A tensor scale is keyed by identity, not value: one changed in place would reuse the
        # launch of its old value, so such calls are checked (and their scale read) every time.
        return None
    try:
        table = None if block_table is None else (
            block_table.shape, block_table.stride(), block_table.dtype, block_table.device)
        key = (q.shape, q.stride(), q.dtype, q.device, q.requires_grad,
               k_cache.shape, k_cache.stride(), k_cache.dtype, k_cache.device,
               k_cache.requires_grad, v_cache.shape, v_cache.stride(), v_cache.dtype,
               v_cache.device, v_cache.requires_grad, cache_seqlens.shape,
               cache_seqlens.stride(), cache_seqlens.dtype, cache_seqlens.device, table,
               torch.is_grad_enabled(), id(layout), sm_scale, num_splits, config, max_cache_len,
               type(max_cache_len))
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def _remember(workspace: DecodeWorkspace, key: tuple, launch: DecodeLaunch,
              layout: BlockLayout) -> None:
    if len(workspace.launches) >= REMEMBERED_LAUNCHES:
        workspace.launches.clear()
    # The layout rides along, so its id in the key is not reused while the entry lives.
    workspace.launches[key] = (launch, layout)


def _check_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cache_seqlens: torch.Tensor, layout: BlockLayout,
                  block_table: torch.Tensor | None, max_cache_len: int | None,
                  sm_scale: float | None, num_splits: int | None) -> int:
    """A decoding step's shapes, types and sizes, read from the tensors' metadata only (no
    values, so no sync); returns the longest cache length the step may see."""
    paged = block_table is not None
    cache_shape = (f"({'num_pages, page_size' if paged else 'batch, max_len'}, kv_heads, dim)")
    if not all(isinstance(t, torch.Tensor) for t in (q, k_cache, v_cache)):
        raise TypeError("q, k_cache and v_cache must be torch.Tensors")
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"q must be (batch, heads, dim) and the caches {cache_shape}, got "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")
    _check_common(q[:, None], k_cache, v_cache, layout, 4, sm_scale,
                  ("q", "k_cache", "v_cache"), cache_shape)
    if not layout.causal:
        raise ValueError("decoding needs a causal layout (a new token sees only the past)")
    _check_lengths_tensor("cache_seqlens", cache_seqlens)
    check_batch("q", q.shape[0])
    batch, capacity = _check_block_table(block_table, q, k_cache) if paged else k_cache.shape[:2]
    if q.shape[0] != batch or cache_seqlens.shape[0] != batch:
        what = "the block table" if paged else "the caches"
        raise ValueError(f"q has batch {q.shape[0]}, {what} {batch}, cache_seqlens "
                         f"{cache_seqlens.shape[0]}")
    max_len = _max_cache_len(max_cache_len, capacity, paged)
    layout.check_seqlen(max_len, 1)
    check_count("num_splits", num_splits, 1, MAX_SPLITS)
    check_group(q.shape[1], k_cache.shape[2])
    return max_len


def _check_values(cache_seqlens: torch.Tensor, block_table: torch.Tensor | None,
                  k_cache: torch.Tensor, max_len: int) -> None:
    """Lengths in [1, max_len] and every page they reach a page of the caches, where reading
    them costs no sync: tensors on the CPU. A step with a workspace never comes here."""
    if cache_seqlens.device.type != "cpu":
        return
    lens = cache_seqlens.tolist()
    if min(lens) < 1 or max(lens) > max_len:
        raise ValueError(f"cache_seqlens must be in [1, {max_len}] (the new token is already "
                         f"in the cache), got {min(lens)}..{max(lens)}")
    if block_table is not None and block_table.device.type == "cpu":
        _check_pages(block_table, lens, k_cache.shape[1], k_cache.shape[0])


def decode_workspace(q: torch.Tensor, kv_heads: int, layout: BlockLayout,
                     num_splits: int | None = None) -> DecodeWorkspace:
    """The buffers of decoding steps shaped like ``q`` ``(batch, heads, dim)`` (its dtype and
    device) against caches of ``kv_heads`` heads, allocated once: the output and, for more than
    one split, the partial outputs of ``num_splits`` splits (None: the count
    :func:`sparse_attention_decode` would choose for this batch shape, worked out here with the
    layout's group plan, so no step builds either). Pass it as ``workspace=`` to every step of
    that shape."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError("q must be a (batch, heads, dim) tensor")
    # q's dtype and device are the outputs': a step refuses any other q.
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: float16, bfloat16, float32")
    check_device("q", q)
    check_batch("q", q.shape[0])
    check_heads(q.shape[1], kv_heads, q.shape[2], layout)
    if not layout.causal:
        raise ValueError("decoding needs a causal layout (a new token sees only the past)")
    # As every step would refuse it; with num_splits given, nothing else here would.
    check_group(q.shape[1], kv_heads)
    check_count("num_splits", num_splits, 1, MAX_SPLITS)
    if num_splits is None:
        num_splits = decode_splits(layout.to(q.device), q.shape[0], q.shape[1], kv_heads,
                                   q.device)
    return new_workspace(q, num_splits, kv_heads)


def _check_block_table(block_table: torch.Tensor, q: torch.Tensor,
                       k_cache: torch.Tensor) -> tuple[int, int]:
    """A paged call's block table and page size; returns (batch, capacity in tokens)."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32 (batch, max_pages), got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[1] < 1:
        raise ValueError(f"block_table must be (batch, max_pages) with max_pages >= 1, got shape "
                         f"{tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise ValueError(f"block_table is on {block_table.device}, q on {q.device}; they must "
                         "share a device")
    page_size = k_cache.shape[1]
    if page_size not in PAGE_SIZES:
        raise ValueError(f"the page size (k_cache.shape[1] with block_table) must be one of "
                         f"{', '.join(map(str, PAGE_SIZES))}, got {page_size}")
    return block_table.shape[0], block_table.shape[1] * page_size


def _max_cache_len(max_cache_len: int | None, capacity: int, paged: bool) -> int:
    if max_cache_len is None:
        return capacity
    if not is_int(max_cache_len):
        raise TypeError(f"max_cache_len must be an int, got {type(max_cache_len).__name__}")
    if not 1 <= max_cache_len <= capacity:
        what = "max_pages * page_size" if paged else "max_len"
        raise ValueError(f"max_cache_len must be in [1, {capacity}] (the caches' capacity, "
                         f"{what}), got {max_cache_len}")
    return int(max_cache_len)


def _check_pages(block_table: torch.Tensor, lens: list[int], page_size: int,
                 num_pages: int) -> None:
    """Every page a sequence's length reaches must be a page of the caches."""
    used = (torch.tensor(lens) + page_size - 1) // page_size
    live = torch.arange(block_table.shape[1])[None, :] < used[:, None]
    bad = live & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, j = bad.nonzero()[0].tolist()
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page of "
                         f"k_cache (pages 0..{num_pages - 1}); sequence {b} of length {lens[b]} "
                         f"reads its first {int(used[b])} pages")


def _check_workspace(workspace: DecodeWorkspace, q: torch.Tensor, kv_heads: int,
                     num_splits: int | None) -> None:
    if not isinstance(workspace, DecodeWorkspace):
        raise TypeError(f"workspace must be a DecodeWorkspace (kernels.decode_workspace), got "
                        f"{type(workspace).__name__}")
    out = workspace.out
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"workspace was made for q {tuple(out.shape)} {out.dtype} on "
                         f"{out.device}, not this call's {tuple(q.shape)} {q.dtype} on {q.device}")
    if num_splits is not None and num_splits != workspace.splits:
        raise ValueError(f"num_splits={num_splits}, but the workspace holds {workspace.splits} "
                         "splits' partials; make it with the same num_splits")
    if workspace.splits == 1:
        return  # one split writes the output itself: no partials to check
    part_out, part_lse, tickets = workspace.part_out, workspace.part_lse, workspace.tickets
    if part_out is None or part_lse is None or tickets is None:
        raise ValueError(f"workspace holds no partial buffers or tickets for its "
                         f"{workspace.splits} splits; make it with decode_workspace")
    rows = q.shape[0] * q.shape[1] * workspace.splits
    if part_out.shape[0] != rows or part_lse.shape != (rows,):
        raise ValueError(f"workspace's partial buffers hold {part_out.shape[0]} rows, not batch * "
                         f"heads * splits = {rows}; make it with decode_workspace")
    groups = q.shape[0] * kv_heads
    if tickets.shape != (groups,) or tickets.dtype != torch.int32 or tickets.device != q.device:
        raise ValueError(f"workspace's tickets are {tuple(tickets.shape)} {tickets.dtype}, not "
                         f"int32 (batch * kv_heads = {groups},) on {q.device}; make it with "
                         "decode_workspace")


# -- the plans, checked ------------------------------------------------------------------------
# Public (kernels.group_plan, kernels.varlen_plan) and built on first use from their arguments
# alone, so they are checked here: the builders live beside their kernels, whose source keys the
# shipped configs, and would fail on bad arguments with a division by zero or a tensor shape.

def group_plan(layout: BlockLayout, num_heads: int, kv_heads: int) -> decode.GroupPlan:
    """Decoding's plan for ``num_heads`` query heads over ``kv_heads``: each kv head's kept
    blocks and which of its query heads keep each (built once, kept on the layout)."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    for name, value in (("num_heads", num_heads), ("kv_heads", kv_heads)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_heads % kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of kv_heads ({kv_heads})")
    if layout.heads not in (1, kv_heads, num_heads):
        raise ValueError(f"layout has {layout.heads} pattern heads; expected 1, "
                         f"kv_heads={kv_heads} or num_heads={num_heads}")
    check_group(num_heads, kv_heads)
    return decode.group_plan(layout, num_heads, kv_heads)


def varlen_plan(layout: BlockLayout, block_m: int, max_k: int):
    """The varlen kernel's tile plan for query tiles of ``block_m`` rows and sequences of at most
    ``max_k`` keys (built once, kept on the layout)."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    for name, value in (("block_m", block_m), ("max_k", max_k)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    problems = query_tile_problems(LaunchConfig(block_m, 16), layout.block_size)
    if problems:
        raise ValueError(problems[0])
    layout.check_seqlen(max_k)
    return varlen.varlen_plan(layout, block_m, max_k)
