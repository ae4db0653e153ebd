"""Sweep specs: every error names the file, the key path and what is allowed; grids expand and
exclusion rules apply; the shipped sweeps validate."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dkbench.errors import SpecError
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import (
    CASE_KEYS,
    Case,
    excluded_for_provider,
    expand,
    filter_cases,
)

from .specs import spec_dict, write_pattern, write_spec

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"

LOCAL = {"type": "local_stride", "block_size": 16, "local_blocks": 1, "vert_stride": 2}


def spec_error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


# -- errors: (overrides, key path, what is allowed) --

ERRORS: list[tuple[str, dict[str, Any], str, str]] = [
    # unknown keys, at every level
    ("unknown top-level key", {"colour": "red"}, "colour: unknown key",
     "allowed keys here: baseline, batch, batch_tokens,"),
    ("unknown timing key", {"timing": {"rep": 3}}, "timing.rep: unknown key",
     "allowed keys here: cuda_graph, interleave, rep_ms, warmup_ms"),
    ("unknown check key", {"check": {"tol": 1}}, "check.tol: unknown key", "max_tokens"),
    ("unknown pattern key", {"patterns": [{**LOCAL, "bogus": 1}]},
     "patterns[0].local_stride.bogus: unknown key", "local_blocks"),
    # wrong types
    ("fractional int", {"heads": 2.5}, "heads: 2.5 is not an integer",
     "allowed: integers 1 to 1024"),
    ("string for int", {"seqlen": "long"}, "seqlen: 'long' is not an integer",
     "allowed: integers 1 to 16777216"),
    ("bad list element", {"heads": [2, "x"]}, "heads[1]: 'x' is not an integer",
     "allowed: integers"),
    ("bad mode", {"mode": "forward"}, "mode: 'forward' is not a mode",
     "allowed: fwd, bwd, fwd_bwd, prefill_varlen, decode"),
    ("bad device", {"device": "gpu"}, "device: 'gpu' is not allowed", "allowed: auto, cuda, cpu"),
    ("bad causal", {"causal": "maybe"}, "causal: 'maybe' is not a boolean",
     "allowed: true, false"),
    ("exclude not a list", {"exclude": {"seqlen": 32}}, "exclude",
     "expected a list, got a mapping"),
    ("bad name", {"name": "my sweep"}, "name", "^[A-Za-z0-9_.-]+$"),
    ("non-positive sm_scale", {"sm_scale": -1.0}, "sm_scale", "greater than 0"),
    ("check.max_tokens too small", {"check": {"max_tokens": 4}}, "check.max_tokens",
     "greater than or equal to 16"),
    ("unknown pattern type", {"patterns": [{"type": "butterfly"}]}, "patterns[0]",
     "pattern types: local_stride, dense, random, file"),
    ("pattern without type", {"patterns": [{"block_size": 16}]}, "patterns[0]",
     "pattern types: local_stride, dense, random, file"),
    ("missing required key", {"seqlen": None}, "seqlen", "required key is missing"),
    ("batch and batch_tokens", {"batch_tokens": 64}, "(top level)",
     "exactly one of 'batch' and 'batch_tokens'"),
    ("neither batch nor batch_tokens", {"batch": None}, "(top level)",
     "exactly one of 'batch' and 'batch_tokens'"),
    # names and values checked after parsing
    ("bad dtype", {"dtype": "fp4"}, "dtype: unknown dtype 'fp4'",
     "allowed: bf16, bfloat16, fp16, float16, half, fp32, float32, fp8, float8_e4m3fn"),
    ("bad dtype in a list", {"dtype": ["fp32", "int8"]}, "dtype[1]: unknown dtype 'int8'",
     "allowed: bf16"),
    ("unknown provider", {"providers": ["sdpa_math", "cutlass"]},
     "providers[1]: unknown provider 'cutlass'", "allowed: dkbench, sdpa_flash"),
    ("baseline not among providers", {"baseline": "dkbench"}, "baseline: 'dkbench'",
     "is not in providers (sdpa_math)"),
    ("exclude rule with unknown key", {"exclude": [{"seqlen": 32, "colour": "red"}]},
     "exclude[0]: unknown key(s) ['colour']", "allowed: mode, dtype, batch, seqlen"),
    ("empty exclude rule", {"exclude": [{}]}, "exclude[0]", "(empty rule)"),
    ("exclude removes every case", {"exclude": [{"seqlen": 32}]}, "exclude",
     "remove every case"),
    # impossible combinations
    ("head_dim too small", {"head_dim": 8}, "head_dim: 8 is not supported", "allowed: 16 to 256"),
    ("head_dim too large in a list", {"head_dim": [16, 512]}, "head_dim: 512 is not supported",
     "allowed: 16 to 256"),
    ("heads not divisible by kv_heads", {"heads": 3, "kv_heads": 2}, "kv_heads",
     "heads=3 is not divisible by kv_heads=2"),
    ("batch_tokens below seqlen", {"batch": None, "batch_tokens": 16}, "batch_tokens",
     "batch of 0"),
    ("q_len above seqlen", {"q_len": 64}, "q_len", "q_len=64 exceeds seqlen=32"),
    ("block size not a power of two", {"patterns": [{**LOCAL, "block_size": 24}]},
     "patterns[0].block_size", "power of two >= 16, got 24"),
    ("too many dense heads", {"patterns": [{**LOCAL, "num_dense_heads": 3}]}, "patterns",
     "num_dense_heads must be in [0, 2], got 3"),
    # zero is not positive (a falsy 0 once slipped past this check and crashed on heads % 0)
    ("zero heads", {"heads": 0}, "heads", "must be a positive integer, got 0"),
    ("zero kv_heads", {"kv_heads": 0}, "kv_heads", "must be a positive integer, got 0"),
    ("zero batch", {"batch": 0}, "batch", "must be a positive integer, got 0"),
    ("zero seqlen", {"seqlen": 0}, "seqlen", "must be a positive integer, got 0"),
    ("zero q_len", {"q_len": 0}, "q_len", "must be a positive integer, got 0"),
    # graph replay times one provider at a time
    ("interleave with cuda_graph", {"timing": {"cuda_graph": True, "interleave": True}}, "timing",
     "timing.interleave and timing.cuda_graph are both true; pick one"),
]


@pytest.mark.parametrize(("overrides", "key", "allowed"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_spec_error_names_file_key_and_allowed(tmp_path: Path, overrides: dict, key: str,
                                               allowed: str) -> None:
    path = write_spec(tmp_path, **overrides)
    message = spec_error(path)
    assert message.startswith(f"{path}: "), message
    assert key in message, message
    assert allowed in message, message


def test_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: tiny\nseqlen: [32, 64\nheads: 2\n")
    message = spec_error(path)
    assert message.startswith(f"{path}: not valid YAML"), message
    assert "line" in message, message  # the parser's position comes along


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("", "NoneType"),
                                            ("just a string\n", "str")])
def test_spec_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    message = spec_error(path)
    assert message == f"{path}: a sweep spec is a YAML mapping of keys, got {kind}"


def test_missing_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert spec_error(path) == f"{path}: no such spec file"


def test_errors_in_several_keys_are_all_listed(tmp_path: Path) -> None:
    path = write_spec(tmp_path, colour="red", heads="two", timing={"rep": 1})
    lines = spec_error(path).splitlines()
    assert lines[0] == f"{path}: invalid sweep spec"
    assert any(line.strip().startswith("colour: unknown key") for line in lines), lines
    assert any(line.strip().startswith("heads") for line in lines), lines
    assert any(line.strip().startswith("timing.rep: unknown key") for line in lines), lines


@pytest.mark.parametrize(("given", "interleave", "cuda_graph"), [
    ({}, True, False),                                      # the default
    ({"cuda_graph": True}, False, True),                    # graphs time one provider at a time
    ({"cuda_graph": True, "interleave": False}, False, True),
    ({"interleave": False}, False, False),
])
def test_timing_interleave(tmp_path: Path, given: dict, interleave: bool,
                           cuda_graph: bool) -> None:
    timing = load_spec(write_spec(tmp_path, timing={"warmup_ms": 1, "rep_ms": 1, **given})).timing
    assert (timing.interleave, timing.cuda_graph) == (interleave, cuda_graph)


@pytest.mark.parametrize("overrides", [
    {"patterns": [{**LOCAL, "homo_head": True, "num_dense_heads": 1}]},
    {"heads": 4, "kv_heads": 1,
     "patterns": [{**LOCAL, "per_kv_group": True, "num_dense_heads": 2}]},
], ids=["dense heads with homo_head", "more dense heads than kv groups"])
def test_local_stride_layout_errors_are_spec_errors(tmp_path: Path, overrides: dict) -> None:
    path = write_spec(tmp_path, **overrides)
    message = spec_error(path)
    assert message.startswith(f"{path}: patterns"), message
    assert "num_dense_heads" in message, message


# -- file patterns --

def causal_pattern(heads: int, blocks: int) -> np.ndarray:
    lower = np.tril(np.ones((blocks, blocks), dtype=bool))
    return np.broadcast_to(lower, (heads, blocks, blocks)).copy()


def test_file_pattern_relative_to_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "specs"
    folder.mkdir()
    pattern = causal_pattern(1, 2)
    pattern[0, 1, 0] = False
    write_pattern(folder, pattern, "diag.npy")
    path = write_spec(folder, patterns=[{"type": "file", "path": "diag.npy", "block_size": 16}])
    monkeypatch.chdir(tmp_path)  # the path is resolved against the spec's folder, not the cwd
    (case,) = expand(load_spec(path))
    assert case.pattern.path == str((folder / "diag.npy").resolve())
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    assert layout.pattern[0].tolist() == [[True, False], [False, True]]


def test_file_pattern_too_short_for_seqlen(tmp_path: Path) -> None:
    write_pattern(tmp_path, causal_pattern(1, 2))  # covers 32 tokens of 16-blocks
    path = write_spec(tmp_path, seqlen=[32, 64],
                      patterns=[{"type": "file", "path": "pattern.npy", "block_size": 16}])
    message = spec_error(path)
    assert message.startswith(f"{path}: patterns: file(pattern.npy,bs16)"), message
    assert "too few for key length 64 (4 blocks needed)" in message, message


def test_file_pattern_head_count(tmp_path: Path) -> None:
    write_pattern(tmp_path, causal_pattern(3, 2))
    path = write_spec(tmp_path, heads=4, kv_heads=2,
                      patterns=[{"type": "file", "path": "pattern.npy", "block_size": 16}])
    message = spec_error(path)
    assert "has 3 heads; expected 1, kv_heads=2 or heads=4" in message, message


def test_file_pattern_missing(tmp_path: Path) -> None:
    path = write_spec(tmp_path, patterns=[{"type": "file", "path": "nope.npy", "block_size": 16}])
    message = spec_error(path)
    assert message.startswith(f"{path}: patterns: "), message
    assert "does not exist" in message, message


# -- grid expansion --

def load(tmp_path: Path, **overrides: Any):
    return load_spec(write_spec(tmp_path, **overrides))


def test_expand_is_the_cartesian_product(tmp_path: Path) -> None:
    axes = {"mode": ["fwd", "bwd"], "dtype": ["fp32", "bf16"], "seqlen": [32, 64],
            "heads": [2, 4], "kv_heads": [1, 2], "causal": [True, False]}
    sweep = load(tmp_path, **axes, sm_scale=0.25, seed=7)
    cases = expand(sweep)
    got = [(c.mode, c.dtype, c.seqlen, c.heads, c.kv_heads, c.causal) for c in cases]
    dtypes = ["float32", "bfloat16"]
    want = list(itertools.product(axes["mode"], dtypes, axes["seqlen"], axes["heads"],
                                  axes["kv_heads"], axes["causal"]))
    assert len(cases) == 64
    assert sorted(got) == sorted(want)
    assert len({c.case_id for c in cases}) == 64
    assert {(c.batch, c.head_dim, c.sm_scale, c.seed) for c in cases} == {(1, 16, 0.25, 7)}
    assert all(c.q_len == c.seqlen for c in cases)
    assert [c.case_id for c in expand(sweep)] == [c.case_id for c in cases]  # stable order


def test_expand_defaults_kv_heads_and_keeps_q_len(tmp_path: Path) -> None:
    cases = expand(load(tmp_path, kv_heads=None, heads=[2, 4], seqlen=64, q_len=[16, 64]))
    assert sorted((c.heads, c.kv_heads, c.q_len) for c in cases) == [
        (2, 2, 16), (2, 2, 64), (4, 4, 16), (4, 4, 64)]


def test_batch_tokens_becomes_batch(tmp_path: Path) -> None:
    cases = expand(load(tmp_path, batch=None, batch_tokens=[128, 256], seqlen=[32, 64]))
    assert sorted((c.seqlen, c.batch) for c in cases) == [(32, 4), (32, 8), (64, 2), (64, 4)]


def test_batch_tokens_rounds_down(tmp_path: Path) -> None:
    (case,) = expand(load(tmp_path, batch=None, batch_tokens=100, seqlen=32))
    assert case.batch == 3


def test_case_is_frozen_and_id_tracks_every_field(tmp_path: Path) -> None:
    (case,) = expand(load(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        case.batch = 2  # type: ignore[misc]
    for change in ({"batch": 2}, {"seqlen": 64}, {"heads": 4}, {"dtype": "bfloat16"},
                   {"mode": "bwd"}, {"causal": False}, {"seed": 1}):
        assert dataclasses.replace(case, **change).case_id != case.case_id, change
    assert dataclasses.replace(case).case_id == case.case_id


# -- exclusion rules --

def keys(cases: list[Case], *names: str) -> list[tuple]:
    return sorted(tuple(c.field(n) for n in names) for c in cases)


def test_case_level_exclusion(tmp_path: Path) -> None:
    cases = expand(load(tmp_path, seqlen=[32, 64], heads=[2, 4],
                        exclude=[{"seqlen": 64, "heads": 4}]))
    assert keys(cases, "seqlen", "heads") == [(32, 2), (32, 4), (64, 2)]


def test_exclusion_values_may_be_lists_and_dtype_aliases(tmp_path: Path) -> None:
    cases = expand(load(tmp_path, seqlen=[32, 64, 128], dtype=["fp32", "bf16"],
                        exclude=[{"seqlen": [32, 64], "dtype": "fp32"},
                                 {"dtype": "bf16", "seqlen": 128}]))
    assert keys(cases, "seqlen", "dtype") == [(32, "bfloat16"), (64, "bfloat16"), (128, "float32")]


def test_exclusion_by_pattern_type_and_causal(tmp_path: Path) -> None:
    patterns = [LOCAL, {"type": "dense", "block_size": 16}]
    cases = expand(load(tmp_path, patterns=patterns, causal=[True, False],
                        exclude=[{"pattern_type": "dense", "causal": False}]))
    assert keys(cases, "pattern_type", "causal") == [
        ("dense", True), ("local_stride", False), ("local_stride", True)]


def test_provider_level_exclusion(tmp_path: Path) -> None:
    sweep = load(tmp_path, seqlen=[32, 64], providers=["sdpa_math", "dkbench"],
                 exclude=[{"provider": "sdpa_math", "seqlen": 64}, {"provider": "dkbench"}])
    cases = expand(sweep)
    assert [c.seqlen for c in cases] == [32, 64]  # a provider rule removes rows, never cases
    by_len = {c.seqlen: c for c in cases}
    assert excluded_for_provider(sweep, by_len[64], "sdpa_math")
    assert not excluded_for_provider(sweep, by_len[32], "sdpa_math")
    assert excluded_for_provider(sweep, by_len[32], "dkbench")
    assert excluded_for_provider(sweep, by_len[64], "dkbench")
    assert not excluded_for_provider(sweep, by_len[64], "sdpa_flash")


# -- --only --

def test_filter_cases(tmp_path: Path) -> None:
    cases = expand(load(tmp_path, seqlen=[32, 64, 128], dtype=["fp32", "bf16"]))
    assert keys(filter_cases(cases, ["seqlen=64"]), "seqlen", "dtype") == [
        (64, "bfloat16"), (64, "float32")]
    assert keys(filter_cases(cases, ["seqlen=32,128", "dtype=bf16"]), "seqlen", "dtype") == [
        (32, "bfloat16"), (128, "bfloat16")]
    assert filter_cases(cases, ["seqlen=96"]) == []
    assert filter_cases(cases, []) == cases


@pytest.mark.parametrize("item", ["seqlen", "colour=red", "provider=dkbench", "=64"])
def test_filter_cases_bad_input(tmp_path: Path, item: str) -> None:
    cases = expand(load(tmp_path))
    with pytest.raises(SpecError) as info:
        filter_cases(cases, [item])
    message = str(info.value)
    assert message.startswith(f"--only {item!r}: expected KEY=VALUE"), message
    allowed = ", ".join(k for k in CASE_KEYS if k != "provider")
    assert message.endswith(allowed), message


def test_filter_by_pattern_label(tmp_path: Path) -> None:
    cases = expand(load(tmp_path, patterns=[LOCAL, {"type": "dense", "block_size": 16}]))
    label = cases[0].pattern.label()
    assert "," in label
    assert filter_cases(cases, [f"pattern={label}"]) == [cases[0]]


def test_filter_by_causal_as_written_in_yaml(tmp_path: Path) -> None:
    cases = expand(load(tmp_path, causal=[True, False]))
    assert keys(filter_cases(cases, ["causal=true"]), "causal") == [(True,)]


# -- the shipped sweeps --

def test_phi3_sweep() -> None:
    sweep = load_spec(SWEEPS / "phi3.yaml")
    cases = expand(sweep)
    modes = sorted({c.mode for c in cases})
    assert modes == ["fwd", "fwd_bwd"]
    assert len(cases) == 4 * len(modes)
    for mode in modes:  # each mode: 4 cases of 65,536 tokens
        assert [(c.seqlen, c.batch) for c in cases if c.mode == mode] == [
            (8192, 8), (16384, 4), (32768, 2), (65536, 1)]
    assert {(c.heads, c.kv_heads, c.head_dim, c.dtype, c.causal) for c in cases} == {
        (32, 8, 128, "bfloat16", True)}
    assert all(c.batch * c.seqlen == 65536 for c in cases)
    assert sweep.baseline == "sdpa_cudnn" and sweep.sm_scale == pytest.approx(1 / 128)
    case = cases[0]
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    assert layout.heads == 32
    # REFERENCE figure: phi-3-small's local-stride pattern keeps 32.4% of causal pairs at 8k.
    assert layout.density(8192) == pytest.approx(0.324, abs=1e-3)
    math_long = [c for c in cases if excluded_for_provider(sweep, c, "sdpa_math")]
    assert sorted({c.seqlen for c in math_long}) == [16384, 32768, 65536]


def test_smoke_sweep() -> None:
    sweep = load_spec(SWEEPS / "smoke.yaml")
    cases = expand(sweep)
    assert [(c.seqlen, c.batch, c.heads, c.kv_heads, c.dtype) for c in cases] == [
        (128, 1, 2, 1, "float32"), (192, 1, 2, 1, "float32")]
    assert sweep.baseline in sweep.providers
    assert "sdpa_math" in sweep.providers and "dkbench" in sweep.providers


def test_spec_dict_helper_is_valid(tmp_path: Path) -> None:
    # The base every other test edits must itself be a valid one-case spec.
    assert spec_dict()["providers"] == ["sdpa_math"]
    assert len(expand(load(tmp_path))) == 1


# -- big sweeps: checked in time proportional to what differs, or refused at once --

def test_validate_100k_seqlens_is_quick(tmp_path: Path) -> None:
    # Each case once built its pattern at full length: minutes for this spec. Patterns are now
    # checked once per (pattern, heads, kv_heads, causal), files once per file.
    import time

    from typer.testing import CliRunner

    from dkbench.cli import app

    path = write_spec(tmp_path, seqlen=list(range(1, 100_001)),
                      patterns=[{**LOCAL, "block_size": 64}])
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", str(path)], env={"COLUMNS": "400"})
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert "ok, 100000 cases" in result.output
    assert elapsed < 10, f"validate took {elapsed:.1f} s"


def test_too_many_cases_refused_at_once(tmp_path: Path) -> None:
    import time

    path = write_spec(tmp_path, heads=list(range(1, 1025)), seqlen=[16 * k for k in range(1, 101)],
                      dtype=["fp32", "bf16"])
    start = time.perf_counter()
    message = spec_error(path)
    assert time.perf_counter() - start < 1
    assert message == (f"{path}: heads: the axes multiply to 204800 cases (2 dtype x 100 seqlen x "
                       "1024 heads); allowed: at most 100000 in one spec (shorten heads or split "
                       "the sweep)")


def test_long_seqlen_checks_without_building_the_layout(tmp_path: Path) -> None:
    # 2**20 tokens in blocks of 64: a full per-head layout would be 2 x 16384 x 16384 bools.
    (case,) = expand(load(tmp_path, seqlen=2**20, patterns=[{**LOCAL, "block_size": 64}]))
    assert case.seqlen == 2**20


# -- the YAML itself --

def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = (write_spec(tmp_path, patterns=None).read_text()
            + "patterns:\n  - &p {type: local_stride, block_size: 16, local_blocks: 1, "
              "vert_stride: 2}\n  - {<<: *p, vert_stride: 4}\n")
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    assert [p.vert_stride for p in load_spec(path).patterns] == [2, 4]


def test_strict_types_still_take_what_yaml_writes(tmp_path: Path) -> None:
    # An integer where a number is wanted is fine; only bools and fractions are refused.
    sweep = load(tmp_path, timing={"warmup_ms": 1, "rep_ms": 2}, sm_scale=1, check={
        "rtol": {"fp32": 1}}, patterns=[{"type": "random", "block_size": 16, "density": 1}])
    assert (sweep.timing.rep_ms, sweep.sm_scale, sweep.check.rtol["float32"]) == (2.0, 1.0, 1.0)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int32, np.int64])
def test_file_pattern_of_zeros_and_ones_loads(tmp_path: Path, dtype: Any) -> None:
    write_pattern(tmp_path, causal_pattern(1, 2).astype(dtype))
    (case,) = expand(load(tmp_path, patterns=[{"type": "file", "path": "pattern.npy",
                                               "block_size": 16}]))
    assert case.pattern.load().dtype == torch.bool


def test_pt_pattern_file_loads(tmp_path: Path) -> None:
    torch.save(torch.from_numpy(causal_pattern(1, 2)).to(torch.int8), tmp_path / "p.pt")
    sweep = load(tmp_path, patterns=[{"type": "file", "path": "p.pt", "block_size": 16}])
    assert sweep.patterns[0].load().tolist() == [[[True, False], [True, True]]]
