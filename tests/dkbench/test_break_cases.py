"""How a sweep spec expands into cases, and how `--only`, `--shard` and `exclude` pick among them:
each case once, under one case_id; the filters matching what the README says they match; and an
impossible or idle key refused before anything runs, naming the file, the key and what is
allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from dkbench.measure.shard import Shard, shard_cases
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand, filter_cases

from .cli_helpers import flat, invoke, pairs, run_dir_of
from .specs import write_spec


def _cases(tmp_path: Path, **overrides):
    return expand(load_spec(write_spec(tmp_path, **overrides)))


def _refused(tmp_path: Path, *phrases: str, **overrides) -> str:
    """`validate` of the spec exits 2 with one message holding the file and ``phrases``."""
    path = write_spec(tmp_path, **overrides)
    result = invoke("validate", path)
    text = flat(result.output)
    assert result.exit_code == 2, text
    assert "Traceback" not in text and str(path) in text, text
    for phrase in phrases:
        assert phrase in text, (phrase, text)
    return text


def test_batch_tokens_flooring_to_one_batch_make_one_case(tmp_path: Path) -> None:
    # At seqlen 64 both 64 and 96 tokens are batch 1 (tokens // seqlen): one case, not two rows
    # under one case_id (which two shards would each run, and merge would refuse).
    spec = dict(batch=None, batch_tokens=[64, 96], seqlen=[32, 64])
    cases = _cases(tmp_path, **spec)
    assert sorted((c.batch, c.seqlen) for c in cases) == [(1, 64), (2, 32), (3, 32)]
    assert len({c.case_id for c in cases}) == len(cases)
    shards = [shard_cases(cases, Shard(i, 3)) for i in (1, 2, 3)]
    assert sorted(c.case_id for s in shards for c in s) == sorted(c.case_id for c in cases)
    result = invoke("validate", write_spec(tmp_path, **spec))
    assert result.exit_code == 0 and "ok, 3 cases" in flat(result.output), result.output


def test_only_given_twice_for_one_key_takes_both_values(tmp_path: Path) -> None:
    cases = _cases(tmp_path, seqlen=[32, 64], mode=["fwd", "bwd"])
    both = filter_cases(cases, ["seqlen=32", "seqlen=64"])
    assert both == filter_cases(cases, ["seqlen=32,64"]) == cases
    assert [(c.mode, c.seqlen) for c in filter_cases(
        cases, ["seqlen=32", "mode=bwd", "seqlen=64"])] == [("bwd", 32), ("bwd", 64)]


def test_only_given_twice_runs_both_values(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DKBENCH_CACHE", str(tmp_path / "cache.json"))
    spec = write_spec(tmp_path, seqlen=[32, 64])
    result = invoke("run", spec, "--out", tmp_path / "out", "-q", "--only", "seqlen=32",
                    "--only", "seqlen=64")
    assert result.exit_code == 0, result.output
    ids = {c.case_id for c in expand(load_spec(spec))}
    assert {case_id for case_id, _ in pairs(run_dir_of(tmp_path / "out"))} == ids


def test_only_takes_integer_spellings_and_null_page_size(tmp_path: Path) -> None:
    cases = _cases(tmp_path, seqlen=[64, 1024], patterns=[
        {"type": "local_stride", "block_size": 16, "local_blocks": 1, "vert_stride": 2}])
    assert [c.seqlen for c in filter_cases(cases, ["seqlen=1k"])] == [1024]
    assert [c.seqlen for c in filter_cases(cases, ["seqlen=1K"])] == [1024]
    assert [c.seqlen for c in filter_cases(cases, ["seqlen=064"])] == [64]
    assert [c.seqlen for c in filter_cases(cases, [" seqlen = 64"])] == [64]
    decode = _cases(tmp_path, mode="decode", seqlen=64, batch=2, page_size=[None, 16])
    assert [c.page_size for c in filter_cases(decode, ["page_size=null"])] == [0]
    assert [c.page_size for c in filter_cases(decode, ["page_size=none,16"])] == [0, 16]


def test_length_spread_with_no_inference_mode_is_refused(tmp_path: Path) -> None:
    # Only prefill_varlen and decode draw lengths: beside fwd/bwd alone it would do nothing.
    _refused(tmp_path, "length_spread:", "prefill_varlen", "allowed:",
             mode=["fwd", "bwd"], length_spread=0.5)
    mixed = _cases(tmp_path, mode=["fwd", "decode"], length_spread=0.5, batch=2)
    assert [(c.mode, c.length_spread) for c in mixed] == [("fwd", 0.0), ("decode", 0.5)]


def test_length_spread_beside_lengths_is_refused(tmp_path: Path) -> None:
    # lengths gives every sequence's length, so a spread to draw them from would do nothing.
    _refused(tmp_path, "length_spread: 0.5 draws", "lengths gives them", "it would do nothing",
             "allowed: one of length_spread and lengths",
             mode="decode", batch=None, lengths=[16, 32], length_spread=0.5)
    (case,) = _cases(tmp_path, mode="decode", batch=None, lengths=[16, 32])
    assert case.lengths == (16, 32) and case.length_spread == 0.0


@pytest.mark.parametrize(("overrides", "phrases"), [
    (dict(q_len=[16, 32], seqlen=[16, 32]), ("q_len:", "q_len=32 exceeds seqlen=16",
                                             "allowed: q_len from 1 to seqlen (16 here)")),
    (dict(heads=6, kv_heads=4), ("kv_heads:", "allowed: a kv_heads that divides heads (1, 2, 3, 6)",)),
    (dict(batch=None, batch_tokens=48, seqlen=[32, 64]), ("batch_tokens:", "allowed: batch_tokens "
                                                          "of at least seqlen (64 here)")),
    (dict(mode="decode", batch=None, lengths=[16, 48], seqlen=[32, 64]),
     ("lengths:", "allowed: lengths from 1 to seqlen (32 here)")),
])
def test_impossible_shapes_name_the_allowed_values(tmp_path: Path, overrides, phrases) -> None:
    _refused(tmp_path, *phrases, **overrides)


def test_an_exclusion_matching_no_case_is_warned_about(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, seqlen=[32, 64], heads=2,
                      exclude=[{"seqlen": 32, "heads": 4}, {"seqlen": 64},
                               {"provider": "sdpa_math", "seqlen": 4096}])
    result = invoke("validate", spec)
    assert result.exit_code == 0, result.output
    text = flat(result.stderr)
    assert "exclude[0] {'seqlen': 32, 'heads': 4} matches no case of the spec" in text, text
    assert "exclude[2]" in text and "exclude[1]" not in text, text


@pytest.mark.parametrize(("overrides", "phrases"), [
    # Was: silently one of the two values (whichever came last).
    (dict(check={"rtol": {"bf16": 0.1, "bfloat16": 0.2}}),
     ("check.rtol: 'bf16' and 'bfloat16' both name bfloat16", "allowed: one of them")),
    # Was: a rule that excluded nothing.
    (dict(exclude=[{"provider": []}]), ("exclude[0].provider: an empty list",
                                        "give at least one provider (dkbench")),
    # Was: accepted, then `run` died with an OSError traceback making NAME-TIME (ENAMETOOLONG).
    (dict(name="a" * 201), ("name: 201 characters; allowed: at most 200",)),
])
def test_idle_or_conflicting_keys_are_refused(tmp_path: Path, overrides, phrases) -> None:
    _refused(tmp_path, *phrases, **overrides)



def test_an_exclusion_of_a_provider_that_does_not_run_is_warned_about(tmp_path: Path) -> None:
    # Legal names (a provider of the registry) that no row of the run has: nothing is left out.
    spec = write_spec(tmp_path, providers=["sdpa_math", "dkbench"],
                      exclude=[{"provider": "flex"}, {"provider": "sdpa_math+graph"},
                               {"provider": ["flex", "dkbench"], "seqlen": 32}])
    result = invoke("validate", spec)
    assert result.exit_code == 0, result.output
    text = flat(result.stderr)
    assert ("exclude[0] {'provider': 'flex'} names no provider that runs here (rows: sdpa_math, "
            "dkbench): it leaves nothing out") in text, text
    assert "exclude[1] {'provider': 'sdpa_math+graph'} names no provider that runs" in text, text
    assert "exclude[2]" not in text, text
    # --providers decides what runs: without dkbench, the third rule leaves nothing out either.
    result = invoke("run", spec, "--providers", "sdpa_math", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    text = flat(result.stderr)
    assert "exclude[2] {'provider': ['flex', 'dkbench'], 'seqlen': 32} names no provider" in text


def test_a_config_without_the_bundled_kernel_is_warned_about(tmp_path: Path) -> None:
    # Was: accepted in silence; the config is for the bundled kernel alone.
    spec = write_spec(tmp_path, config={"block_m": 16, "block_n": 16})
    result = invoke("validate", spec)
    assert result.exit_code == 0, result.output
    assert ("config applies to the bundled kernel (provider dkbench), which does not run here "
            "(providers: sdpa_math): it does nothing") in flat(result.stderr), result.stderr
    result = invoke("run", spec, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert "config applies to the bundled kernel" in flat(result.stderr), result.stderr
    # With the bundled kernel among the providers, no word of it.
    both = write_spec(tmp_path, "both.yaml", config={"block_m": 16, "block_n": 16},
                      providers=["sdpa_math", "dkbench"])
    result = invoke("validate", both)
    assert result.exit_code == 0, result.output
    assert "config applies" not in flat(result.stderr), result.stderr
