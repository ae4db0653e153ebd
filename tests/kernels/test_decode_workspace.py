"""A graph-ready decoding step: with a workspace it gives the answer of a plain call and of the
reference (contiguous or paged, GQA, ragged lengths), reads no tensor's values and converts
nothing; a step is one kernel: with one split writing the output itself (no partials, no
tickets), with several the last split of each kv group merging them and resetting its ticket."""

import pytest
import torch

import kernels.buffers
import kernels.decode
import kernels.inference
from kernels import decode_workspace, reference_attention, sparse_attention_decode
from tests.kernels.cases import make_layout
from tests.kernels.test_paged_decode import paginate
from tests.tolerances import assert_verbose_close, rel_tol

MAX_LEN = 160

# heads, kv heads, dtype, page size (0: a contiguous cache), splits (None: the automatic count)
STEPS = [
    (4, 2, torch.float32, 0, None),
    (8, 2, torch.float16, 0, 3),
    (2, 2, torch.float32, 16, 1),
    (4, 1, torch.float32, 32, 2),
    (6, 2, torch.float16, 64, None),
]


def _problem(heads: int, kv_heads: int, dtype: torch.dtype, device: str, page: int, seed: int):
    """Ragged random lengths (the full cache and one token among them), q and caches, and the
    paged form of the caches when ``page``: (q, k, v, lens, table, k_pages, v_pages)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [MAX_LEN, 1, *torch.randint(2, MAX_LEN, (3,), generator=gen).tolist()]
    q = torch.randn(len(lengths), heads, 32, device=device, dtype=dtype)
    k = torch.randn(len(lengths), MAX_LEN, kv_heads, 32, device=device, dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.tensor(lengths, device=device, dtype=torch.int32)
    paged = paginate(lengths, page, k, v, generator=gen) if page else (None, k, v)
    return q, k, v, lens, *paged


def _call(q, lens, layout, table, k_cache, v_cache, **kwargs):
    return sparse_attention_decode(q, k_cache, v_cache, lens, layout, block_table=table,
                                   max_cache_len=MAX_LEN, **kwargs)


@pytest.mark.parametrize("step", STEPS, ids=lambda s: f"h{s[0]}/{s[1]}-{str(s[2])[6:]}-"
                         f"{'page' + str(s[3]) if s[3] else 'contiguous'}-splits{s[4]}")
def test_a_step_with_a_workspace_equals_a_plain_call_and_the_reference(step, device,
                                                                       poison_outputs):
    heads, kv_heads, dtype, page, splits = step
    layout = make_layout("hetero", heads, kv_heads, MAX_LEN, 32)
    q, k, v, lens, table, k_cache, v_cache = _problem(heads, kv_heads, dtype, device, page,
                                                      seed=heads * 100 + page)
    workspace = decode_workspace(q, kv_heads, layout, num_splits=splits)
    plain = _call(q, lens, layout, table, k_cache, v_cache, num_splits=workspace.splits)
    stepped = _call(q, lens, layout, table, k_cache, v_cache, workspace=workspace)
    assert stepped is workspace.out
    torch.testing.assert_close(stepped, plain, rtol=0, atol=0)  # one kernel, one split count
    for b, n in enumerate(lens.tolist()):
        ref = reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n], layout)[0, 0]
        assert_verbose_close(stepped[b], ref, rel_tol(dtype, device), f"sequence {b}")
    # A second step of new queries and shorter lengths (within every sequence's pages)
    # overwrites the same output.
    q.copy_(torch.randn_like(q))
    lens.copy_((lens - 7).clamp(min=1))
    again = _call(q, lens, layout, table, k_cache, v_cache, workspace=workspace)
    assert again is stepped
    torch.testing.assert_close(again, _call(q, lens, layout, table, k_cache, v_cache,
                                            num_splits=workspace.splits), rtol=0, atol=0)


class Launches:
    """Stands in for a jit kernel: records each launch's grid and constexprs, then runs it."""

    def __init__(self, kernel) -> None:
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    split = Launches(kernels.decode._decode_split)
    monkeypatch.setattr(kernels.decode, "_decode_split", split)
    return split



@pytest.mark.parametrize("workspace", [False, True])
def test_one_split_is_one_kernel_writing_the_output(workspace, device, launches, allocations):
    layout = make_layout("homo", 4, 2, MAX_LEN, 32)
    q, k, v, lens, *_ = _problem(4, 2, torch.float32, device, 0, seed=1)
    space = decode_workspace(q, 2, layout, num_splits=1) if workspace else None
    if space is not None:
        assert space.part_out is None and space.part_lse is None
    out = sparse_attention_decode(q, k, v, lens, layout, num_splits=1, workspace=space)
    ((grid, constexprs),) = launches.seen
    assert grid[0] == 1 and constexprs["SPLIT"] is False
    assert allocations == [tuple(q.shape)], "one split allocates the output alone"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("workspace", [False, True])
def test_several_splits_are_one_kernel_that_merges_and_resets_its_tickets(workspace, device,
                                                                          launches, allocations):
    layout = make_layout("homo", 4, 2, MAX_LEN, 32)
    q, k, v, lens, *_ = _problem(4, 2, torch.float32, device, 0, seed=2)
    space = decode_workspace(q, 2, layout, num_splits=3) if workspace else None
    out = sparse_attention_decode(q, k, v, lens, layout, num_splits=3, workspace=space)
    assert [(g, c["SPLIT"]) for g, c in launches.seen] == [((3, 5 * 2), True)]
    assert allocations == [tuple(q.shape), (5 * 4 * 3, 32), (5 * 4 * 3,)]
    if space is not None:
        assert space.tickets.shape == (5 * 2,) and space.tickets.dtype == torch.int32
        assert space.tickets.tolist() == [0] * 10, "the merging split resets its group's ticket"
    for b, n in enumerate(lens.tolist()):
        ref = reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n], layout)[0, 0]
        assert_verbose_close(out[b], ref, rel_tol(torch.float32, device), f"sequence {b}")


def test_a_step_with_a_workspace_reads_and_converts_nothing(device, monkeypatch):
    layout = make_layout("homo", 2, 2, MAX_LEN, 32)
    q, _, _, lens, table, k_pages, v_pages = _problem(2, 2, torch.float32, device, 16, seed=3)
    workspace = decode_workspace(q, 2, layout)

    def reads(*args):
        raise AssertionError("a step with a workspace read lengths or pages")

    monkeypatch.setattr(kernels.inference, "_check_values", reads)
    out = _call(q, lens, layout, table, k_pages, v_pages, workspace=workspace)
    assert out is workspace.out
    with pytest.raises(AssertionError, match="read lengths or pages"):
        _call(q, lens, layout, table, k_pages, v_pages)  # without one, CPU lengths are checked
    with pytest.raises(TypeError, match="with a workspace, cache_seqlens must be int32"):
        _call(q, lens.long(), layout, table, k_pages, v_pages, workspace=workspace)


def test_a_workspace_of_several_splits_needs_its_partials(device):
    layout = make_layout("homo", 2, 2, MAX_LEN, 32)
    q, k, v, lens, *_ = _problem(2, 2, torch.float32, device, 0, seed=4)
    workspace = decode_workspace(q, 2, layout, num_splits=2)
    broken = kernels.decode.DecodeWorkspace(workspace.out, None, None, 2)
    with pytest.raises(ValueError, match="holds no partial buffers or tickets for its 2 splits"):
        sparse_attention_decode(q, k, v, lens, layout, workspace=broken)


def test_a_workspace_checks_a_call_once_and_every_changed_call_again(device, monkeypatch):
    layout = make_layout("homo", 4, 2, MAX_LEN, 32)
    q, k, v, lens, *_ = _problem(4, 2, torch.float32, device, 0, seed=5)
    workspace = decode_workspace(q, 2, layout, num_splits=2)
    first = sparse_attention_decode(q, k, v, lens, layout, workspace=workspace).clone()
    checks = []
    check_decode = kernels.inference._check_decode
    monkeypatch.setattr(kernels.inference, "_check_decode",
                        lambda *args: checks.append(1) or check_decode(*args))
    # The same shapes again, new values: launched without a check, the same answer as a fresh
    # call.
    again = sparse_attention_decode(q, k, v, lens, layout, workspace=workspace)
    assert checks == []
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    q2 = torch.randn_like(q)
    stepped = sparse_attention_decode(q2, k, v, lens, layout, workspace=workspace).clone()
    torch.testing.assert_close(stepped, sparse_attention_decode(q2, k, v, lens, layout,
                                                                num_splits=2), rtol=0, atol=0)
    assert checks == [1], "only the call without a workspace is checked"
    # Whatever the checks read, changed, is checked again.
    with pytest.raises(ValueError, match="workspace was made for q"):
        sparse_attention_decode(q[:3], k[:3], v[:3], lens[:3], layout, workspace=workspace)
    with pytest.raises(ValueError, match="requires grad"):
        sparse_attention_decode(q.clone().requires_grad_(), k, v, lens, layout,
                                workspace=workspace)
    with pytest.raises(ValueError, match="num_splits=3"):
        sparse_attention_decode(q, k, v, lens, layout, num_splits=3, workspace=workspace)
    with pytest.raises(ValueError, match="sm_scale must be"):
        sparse_attention_decode(q, k, v, lens, layout, sm_scale=-1.0, workspace=workspace)
    other = make_layout("homo", 4, 2, MAX_LEN // 2, 32)
    with pytest.raises(ValueError):
        sparse_attention_decode(q, k, v, lens, other, workspace=workspace)
    assert len(checks) == 6
