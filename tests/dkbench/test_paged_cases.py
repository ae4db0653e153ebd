"""Paged decode cases end to end on the CPU: the `page_size` axis, its validation, the block
table and inputs of a case, the rows (`page_size` column), and old results files still keying,
gating and plotting."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch

from dkbench.errors import SpecError
from dkbench.gate.compare import run_gate
from dkbench.measure.modes import block_table, make_inputs, sequence_lengths
from dkbench.measure.providers import Unsupported
from dkbench.measure.providers import flashinfer as fi
from dkbench.measure.providers.fa4 import Fa4
from dkbench.results.runs import load_run
from dkbench.results.schema import COLUMNS, KEY_COLUMNS, read_results
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand, filter_cases

from .cli_helpers import flat, invoke, run_to_end
from .specs import needs_interpreter, write_spec

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
DECODE = dict(mode="decode", seqlen=64, batch=3, length_spread=0.5, heads=4, kv_heads=2,
              patterns=[{"type": "local_stride", "block_size": 32, "local_blocks": 1,
                         "vert_stride": 2, "head_sliding_offset": 1}])


def _cases(tmp_path: Path, **overrides):
    return expand(load_spec(write_spec(tmp_path, **{**DECODE, **overrides})))


def test_page_size_is_an_axis_of_decode_cases(tmp_path: Path) -> None:
    contiguous, page16, page64 = _cases(tmp_path, page_size=[None, 16, 64])
    assert [c.page_size for c in (contiguous, page16, page64)] == [0, 16, 64]
    assert len({c.case_id for c in (contiguous, page16, page64)}) == 3
    assert page16.label().endswith(" page16") and "page" not in contiguous.label()
    # A contiguous case keeps the id it had before the axis existed (old runs resume and merge).
    (before,) = _cases(tmp_path)
    assert before.case_id == contiguous.case_id
    # Paged cases draw their contiguous twin's lengths: the rows compare one for one.
    assert sequence_lengths(page16) == sequence_lengths(contiguous)
    only = filter_cases([contiguous, page16, page64], ["page_size=16"])
    assert [c.page_size for c in only] == [16]
    (kept,) = _cases(tmp_path, page_size=[None, 16], exclude=[{"page_size": None}])
    assert kept.page_size == 16


def test_the_shipped_decode_sweep_keeps_its_committed_case_ids() -> None:
    sweep = load_spec(ROOT / "sweeps" / "decode.yaml")
    cases = expand(sweep)
    # A file from before paging keys only contiguous cases; today's has the paged ones too.
    old = read_results(ROOT / "benchmarks" / "results" / "decode-h200-338e663.csv")
    assert set(old["case_id"]) <= {c.case_id for c in cases if not c.page_size}
    new = read_results(ROOT / "benchmarks" / "results" / "decode-h200.csv")
    assert set(new["case_id"]) == {c.case_id for c in cases}
    assert {c.page_size for c in cases} == {0, 16, 64}


ALLOWED = "allowed: null (a contiguous cache), 16, 32, 64, 128, 256"


@pytest.mark.parametrize("value,where,phrase", [
    ([None, 24], "page_size[1]", f"24 is not a page size; {ALLOWED}"),
    (8, "page_size", f"8 is not a page size; {ALLOWED}"),
    ([True], "page_size[0]", f"true is not a page size; {ALLOWED}"),
    ([], "page_size", f"an empty list; give at least one value ({ALLOWED})"),
    ([16, 16], "page_size[1]", "16 is given twice"),
])
def test_bad_page_sizes_name_the_file_key_and_allowed_values(tmp_path: Path, value, where,
                                                               phrase) -> None:
    path = write_spec(tmp_path, **DECODE, page_size=value)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message and f"{where}: {phrase}" in message, message
    result = invoke("validate", path)
    assert result.exit_code == 2, result.output
    assert f"{where}: {phrase}" in flat(result.stderr), result.stderr


def test_page_size_applies_to_decode_only(tmp_path: Path) -> None:
    spec = {**DECODE, "mode": ["fwd", "decode"]}
    path = write_spec(tmp_path, **spec, page_size=[None, 16])
    with pytest.raises(SpecError, match=r"page_size: a paged KV cache applies to mode decode "
                                        r"only, and the spec's modes are fwd, decode"):
        load_spec(path)
    # Left out, or null only, other modes are as before.
    assert len(expand(load_spec(write_spec(tmp_path, **spec, page_size=[None])))) == 2


def test_a_cases_block_table_is_reproducible_shuffled_and_covers_each_sequence(
        tmp_path: Path) -> None:
    _, case = _cases(tmp_path, page_size=[None, 16])
    table = block_table(case)
    assert table.dtype == torch.int32 and table.shape == (3, 4)
    assert torch.equal(table, block_table(case))
    used = [math.ceil(n / 16) for n in sequence_lengths(case)]
    live = torch.cat([table[b, :n] for b, n in enumerate(used)])
    assert sorted(live.tolist()) == list(range(sum(used)))  # each page once, none unused
    assert not torch.equal(live, torch.arange(sum(used), dtype=torch.int32))


def test_paged_inputs_hold_the_pages_and_their_gathered_copy(tmp_path: Path) -> None:
    _, case = _cases(tmp_path, page_size=[None, 16])
    inputs = make_inputs(case, CPU, seed=5)
    k_pages, v_pages, table = inputs.paged
    assert k_pages.shape == (int(table.max()) + 1, 16, 2, 16)
    for b, n in enumerate(inputs.lengths):
        for cache, pages in ((inputs.k_cache, k_pages), (inputs.v_cache, v_pages)):
            rows = pages[table[b].long()].flatten(0, 1)[:n]
            torch.testing.assert_close(cache[b, :n], rows, rtol=0, atol=0)
    contiguous = make_inputs(_cases(tmp_path, page_size=[None, 16])[0], CPU, seed=5)
    assert contiguous.paged is None


@needs_interpreter
def test_run_gives_ok_paged_rows_with_their_page_size(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, **DECODE, page_size=[None, 16],
                      providers=["sdpa_math", "dkbench", "flashinfer_decode", "fa4"],
                      baseline="sdpa_math")
    run_dir = run_to_end(spec, tmp_path / "out")
    rows = read_results(run_dir)
    assert list(rows.columns) == list(COLUMNS) and "page_size" in COLUMNS
    assert sorted(rows["page_size"].unique()) == [0, 16]
    by = {(r.provider, r.page_size): r for r in rows.itertuples()}
    for page in (0, 16):
        for name in ("sdpa_math", "dkbench"):
            row = by[(name, page)]
            assert row.status == "ok", row.message
            assert row.rel_err < 1e-6 and row.speedup > 0
        for name in ("flashinfer_decode", "fa4"):
            assert by[(name, page)].status == "unsupported"
    assert by[("dkbench", 16)].config.endswith(" page16")
    assert by[("sdpa_math", 16)].config == ("pages of 16 gathered into a contiguous cache "
                                            "outside timing")
    assert by[("dkbench", 0)].case_id != by[("dkbench", 16)].case_id
    # Same lengths, same pattern: the paged and contiguous rows count the same work.
    assert by[("dkbench", 0)].flops == by[("dkbench", 16)].flops


def test_old_results_without_the_column_still_key_gate_and_plot(tmp_path: Path) -> None:
    old = ROOT / "benchmarks" / "results" / "decode-h200-338e663.csv"
    assert "page_size" not in old.read_text().splitlines()[0].split(",")
    frame = read_results(old)
    assert "page_size" in KEY_COLUMNS and (frame["page_size"] == 0).all()
    result = run_gate(old, old)
    assert result.comparisons and not any(c.verdict == "regression" for c in result.comparisons)
    # A new file (with the column) against the old one (without) matches row for row.
    new = tmp_path / "new.csv"
    frame.to_csv(new, index=False)
    assert len(run_gate(new, old).comparisons) == len(result.comparisons)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.csv").write_bytes(old.read_bytes())
    assert (load_run(run_dir).results["page_size"] == 0).all()


def _paged_case(tmp_path: Path, **overrides):
    sweep = load_spec(write_spec(tmp_path, **{**DECODE, "page_size": [16], **overrides}))
    (case,) = expand(sweep)
    return sweep, case, case.pattern.layout(case.heads, case.kv_heads, case.seqlen, True)


def test_flashinfer_plans_the_cases_own_pages(tmp_path: Path, monkeypatch) -> None:
    """Without FlashInfer: a stand-in wrapper records what the adapter plans and runs."""

    seen: dict = {}

    class Wrapper:
        def __init__(self, workspace, layout, use_tensor_cores=False):
            seen["layout"] = layout

        def plan(self, indptr, indices, last, heads, kv_heads, dim, page, **kwargs):
            seen["plan"] = (indptr, indices, last, page)

        def run(self, q, caches):
            seen["run"] = caches
            return torch.zeros_like(q)

    monkeypatch.setitem(sys.modules, "flashinfer",
                        types.SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=Wrapper))
    monkeypatch.setattr(fi, "_workspace", lambda device: torch.zeros(8, dtype=torch.uint8))
    sweep, case, layout = _paged_case(tmp_path)
    prepared = fi.FlashInferDecode().prepare(case, layout, sweep, CPU, 0.25)
    inputs = make_inputs(case, CPU, seed=1)
    prepared.attn(*inputs)
    indptr, indices, last, page = seen["plan"]
    assert page == 16 and seen["layout"] == "NHD" and "the case's pages" in prepared.config
    assert seen["run"][0] is inputs.paged.k_pages and seen["run"][1] is inputs.paged.v_pages
    table = inputs.paged.block_table
    for b, n in enumerate(inputs.lengths):  # the planned pages hold the sequence, in order
        own = indices[indptr[b]:indptr[b + 1]].long()
        assert torch.equal(own, table[b, :len(own)].long())
        rows = inputs.paged.k_pages[own].flatten(0, 1)[:(len(own) - 1) * 16 + int(last[b])]
        torch.testing.assert_close(rows, inputs.k_cache[b, :n], rtol=0, atol=0)
    pinned = sweep.model_copy(update={"provider_options": {"flashinfer_decode": {"page_size": 32}}})
    with pytest.raises(Unsupported, match="page_size 32 is not this case's page_size 16"):
        fi.FlashInferDecode().prepare(case, layout, pinned, CPU, 0.25)


def test_fa4_reads_the_pages_through_its_page_table(tmp_path: Path, monkeypatch) -> None:
    """Without FA4: a stand-in records the arguments of its varlen entry."""

    seen: dict = {}

    def varlen(q, k, v, **kwargs):
        seen.update(kwargs, k=k, v=v)
        return torch.zeros_like(q), None

    cute = types.SimpleNamespace(flash_attn_func=None, flash_attn_varlen_func=varlen)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(cute=cute))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    sweep, case, layout = _paged_case(tmp_path)
    prepared = Fa4().prepare(case, layout, sweep, CPU, 0.25)
    inputs = make_inputs(case, CPU, seed=1)
    assert prepared.attn(*inputs).shape == inputs.q.shape
    assert seen["k"] is inputs.paged.k_pages and seen["v"] is inputs.paged.v_pages
    assert seen["page_table"] is inputs.paged.block_table
    assert seen["seqused_k"] is inputs.cache_seqlens and prepared.config.endswith("page16")
    contiguous = make_inputs(_cases(tmp_path, page_size=[None])[0], CPU, seed=1)
    seen.clear()
    prepared = Fa4().prepare(_cases(tmp_path)[0], layout, sweep, CPU, 0.25)
    prepared.attn(*contiguous)
    assert "page_table" not in seen and seen["k"] is contiguous.k_cache
