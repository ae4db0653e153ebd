"""A corpus of bad input, each through the real CLI: bad specs and pattern files under `validate`,
bad flags under `run --device cpu`. Every one exits 2 with a message on stderr that names the
offending file and key (or flag), and none shows a traceback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml

from .cli_helpers import flat, invoke
from .specs import spec_dict, write_spec

LOCAL = {"type": "local_stride", "block_size": 16, "local_blocks": 1, "vert_stride": 2}
LOCAL_LABEL = "local_stride(bs16,l1,s2,head,off0)"




@dataclass
class Bad:
    """One bad input: ``make(folder)`` writes it and returns the spec path; ``expect`` are the
    phrases the message must hold (the key, what is wrong, what is allowed)."""

    id: str
    make: Callable[[Path], Path]
    expect: tuple[str, ...]
    names: str | None = None  # a file the message must name besides the spec (a pattern file)


def spec(**overrides: Any) -> Callable[[Path], Path]:
    return lambda folder: write_spec(folder, **overrides)


def text(body: str | bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "spec.yaml"
        if isinstance(body, bytes):
            path.write_bytes(body)
        else:
            path.write_text(body)
        return path
    return make


def with_key_twice(key_line: str) -> Callable[[Path], Path]:
    """The tiny spec with ``key_line`` appended: a key that the spec already has."""
    return text(yaml.safe_dump(spec_dict(), sort_keys=False) + key_line + "\n")


def directory(folder: Path) -> Path:
    (folder / "spec.yaml").mkdir()
    return folder / "spec.yaml"


def pattern_file(name: str, save: Callable[[Path], None] | None,
                 **overrides: Any) -> Callable[[Path], Path]:
    """A spec whose one pattern is the file ``name``, written by ``save`` (unless it is None)."""
    def make(folder: Path) -> Path:
        if save is not None:
            save(folder / name)
        return write_spec(folder, patterns=[{"type": "file", "path": name, "block_size": 16}],
                          **overrides)
    return make


def lower(blocks: int, dtype: Any = bool) -> np.ndarray:
    return np.tril(np.ones((1, blocks, blocks))).astype(dtype)


def npy(array: np.ndarray, **kwargs: Any) -> Callable[[Path], None]:
    return lambda path: np.save(path, array, **kwargs)


def raw(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def torch_save(obj: Any) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, path)


class NotATensor:
    """A class that `torch.load(weights_only=True)` refuses to unpickle."""


with_fa4 = {"providers": ["sdpa_math", "fa4_sparse"]}
many_heads = list(range(1, 1025))  # with kv_heads 1, each divides

SPECS = [
    # unknown keys and names
    Bad("unknown top-level key", spec(colour="red"), ("colour: unknown key", "allowed keys here:")),
    Bad("unknown pattern type", spec(patterns=[{"type": "butterfly"}]),
        ("patterns[0]: unknown pattern type 'butterfly'", "pattern types: local_stride, dense")),
    Bad("pattern without type", spec(patterns=[{"block_size": 16}]),
        ("patterns[0]: no 'type' key", "pattern types:")),
    Bad("unknown pattern key", spec(patterns=[{**LOCAL, "local": 2}]),
        ("patterns[0].local_stride.local: unknown key", "local_blocks")),
    Bad("unknown provider", spec(providers=["sdpa_math", "cutlass"]),
        ("providers[1]: unknown provider 'cutlass'", "allowed: dkbench")),
    Bad("baseline not in providers", spec(baseline="dkbench"),
        ("baseline: 'dkbench' is not in providers (sdpa_math)",)),
    Bad("options for an unlisted provider", spec(provider_options={"cutlass": {"x": 1}}),
        ("provider_options.cutlass: 'cutlass' is not in providers",)),
    Bad("options key misspelt", spec(**with_fa4, provider_options={
        "fa4_sparse": {"fwd_blok": [128, 64]}}),
        ("provider_options.fa4_sparse.fwd_blok: unknown key", "allowed keys here: bwd_block, "
         "fwd_block")),
    Bad("options block not a multiple of 16", spec(**with_fa4, provider_options={
        "fa4_sparse": {"fwd_block": [100, 64]}}),
        ("provider_options.fa4_sparse.fwd_block[0]: must be a multiple of 16, got 100",)),
    Bad("options block as text", spec(**with_fa4, provider_options={
        "fa4_sparse": {"fwd_block": ["64", 64]}}),
        ("provider_options.fa4_sparse.fwd_block[0]: '64' is not an integer",)),
    Bad("options flag as text", spec(providers=["sdpa_math", "flashinfer_decode"],
                                     provider_options={"flashinfer_decode": {
                                         "use_tensor_cores": "yes"}}),
        ("provider_options.flashinfer_decode.use_tensor_cores: 'yes' is not a boolean",)),
    Bad("options page size a float", spec(providers=["sdpa_math", "flashinfer_decode"],
                                          provider_options={"flashinfer_decode": {
                                              "page_size": 16.0}}),
        ("provider_options.flashinfer_decode.page_size: 16.0 is not an integer",)),
    Bad("options for a provider without options", spec(provider_options={"sdpa_math": {"x": 1}}),
        ("provider_options.sdpa_math: sdpa_math takes no options",)),
    Bad("config unknown key", spec(config={"block_m": 64, "block_n": 64, "warps": 4}),
        ("config.warps: unknown key", "allowed keys here: block_m, block_n, impl")),
    Bad("config with a zero tile", spec(config={"block_m": 0, "block_n": 16}),
        ("config: m0n16w4s2 cannot run block_size 16, head_dim 16",
         "block_m=0 must be a power of two >= 16")),
    Bad("config tile wider than the block", spec(config={"block_m": 16, "block_n": 64}),
        ("config: m16n64w4s2 cannot run block_size 16",
         "block_n=64 must not exceed the sparse block size 16")),
    Bad("config with 3 warps", spec(config={"block_m": 16, "block_n": 16, "num_warps": 3}),
        ("num_warps=3 must be one of 1, 2, 4, 8, 16",)),
    # Was accepted: no kernel holds 1000 pipeline stages in shared memory.
    Bad("config with 1000 stages", spec(config={"block_m": 16, "block_n": 16,
                                                "num_stages": 1000}),
        ("config: m16n16w4s1000 cannot run", "num_stages=1000 must be 1 to 8")),
    Bad("exclude rule with unknown key", spec(exclude=[{"colour": "red"}]),
        ("exclude[0]: unknown key(s) ['colour']", "allowed: mode, dtype")),
    Bad("exclude removes every case", spec(exclude=[{"seqlen": 32}]),
        ("exclude: the exclusion rules remove every case",)),
    Bad("check.rtol unknown dtype", spec(check={"rtol": {"fp4": 0.1}}),
        ("check.rtol: unknown dtype(s) ['fp4']", "allowed: bf16")),
    # wrong types, in the project's words
    Bad("mode train", spec(mode="train"),
        ("mode: 'train' is not a mode; allowed: fwd, bwd, fwd_bwd, prefill_varlen, decode",)),
    Bad("dtype a number", spec(dtype=3), ("dtype: 3 is not a dtype; allowed: bf16, bfloat16",)),
    Bad("dtype unknown", spec(dtype="fp4"), ("dtype: unknown dtype 'fp4'", "allowed: bf16")),
    Bad("causal maybe", spec(causal="maybe"),
        ("causal: 'maybe' is not a boolean; allowed: true, false",)),
    Bad("rep_ms fast", spec(timing={"rep_ms": "fast"}),
        ("timing.rep_ms: 'fast' is not a finite number; allowed: numbers > 0",)),
    Bad("device gpu", spec(device="gpu"),
        ("device: 'gpu' is not allowed; allowed: auto, cuda, cpu",)),
    Bad("name with a space", spec(name="my sweep"), ("name: 'my sweep' is not allowed",)),
    Bad("timing not a mapping", spec(timing=5), ("timing: expected a mapping of keys, got an "
                                                 "integer",)),
    Bad("sm_scale infinite", spec(sm_scale=float("inf")),
        ("sm_scale: inf is not a finite number",)),
    # strict types: booleans are not integers, nor are fractions
    Bad("heads true", spec(heads=True), ("heads: true is not an integer; allowed: integers 1 to "
                                         "1024",)),
    Bad("head_dim 64.5", spec(head_dim=64.5), ("head_dim: 64.5 is not an integer",)),
    Bad("seqlen element true", spec(seqlen=[32, True]), ("seqlen[1]: true is not an integer",)),
    Bad("block_size true", spec(patterns=[{**LOCAL, "block_size": True}]),
        ("patterns[0].local_stride.block_size: true is not an integer",)),
    Bad("seed 1.5", spec(seed=1.5), ("seed: 1.5 is not an integer",)),
    # values out of range
    Bad("bad block_size", spec(patterns=[{**LOCAL, "block_size": 24}]),
        ("patterns[0].block_size: must be a power of two >= 16, got 24",)),
    Bad("block_size too large", spec(patterns=[{**LOCAL, "block_size": 4096}]),
        ("patterns[0].block_size:", "got 4096", "allowed: 16, 32")),
    Bad("absurd seqlen", spec(seqlen=[1099511627776]),
        ("seqlen: 1099511627776 is too large; allowed: 1 to 16777216",)),
    Bad("absurd heads", spec(heads=4096, kv_heads=1),
        ("heads: 4096 is too large; allowed: 1 to 1024",)),
    Bad("absurd batch", spec(batch=2**21), ("batch: 2097152 is too large; allowed: 1 to 1048576",)),
    Bad("head_dim too large", spec(head_dim=512), ("head_dim: 512 is not supported; allowed: 16 to "
                                                   "256",)),
    Bad("warmup_ms negative", spec(timing={"warmup_ms": -1, "rep_ms": 1}),
        ("timing.warmup_ms: must be greater than 0", "got -1")),
    Bad("length_spread 1", spec(length_spread=1.0), ("length_spread: must be less than 1",)),
    Bad("random density 0", spec(patterns=[{"type": "random", "block_size": 16, "density": 0}]),
        ("patterns[0].random.density: must be greater than 0",)),
    Bad("layout too large", spec(seqlen=2**24, patterns=[{"type": "dense", "block_size": 16}]),
        ("patterns: dense(bs16) at seqlen=16777216 is 1 x 1048576 x 1048576 blocks",
         "allowed: at most 2**32")),
    # Was accepted (2.5e9 blocks is under 2**32), to fail or take gigabytes in the run.
    Bad("layout side too long", spec(seqlen=800_000, patterns=[{**LOCAL, "homo_head": True}]),
        ("patterns: local_stride(bs16,l1,s2,homo,off0) at seqlen=800000 is 50000 blocks a side",
         "allowed: at most 46340", "seqlen up to 741440 at block_size 16")),
    Bad("too many cases", spec(heads=many_heads, seqlen=[16 * k for k in range(1, 101)]),
        ("heads: the axes multiply to 102400 cases (100 seqlen x 1024 heads)",
         "allowed: at most 100000")),
    # empty and repeated axes
    Bad("seqlen empty", spec(seqlen=[]), ("seqlen: an empty list",)),
    Bad("heads empty", spec(heads=[]), ("heads: an empty list",)),
    Bad("mode empty", spec(mode=[]), ("mode: an empty list", "allowed: fwd")),
    Bad("patterns empty", spec(patterns=[]), ("patterns: an empty list",)),
    Bad("providers empty", spec(providers=[]), ("providers: an empty list",)),
    Bad("seqlen twice", spec(seqlen=[128, 128]), ("seqlen[1]: 128 is given twice (also at [0])",)),
    Bad("dtype alias twice", spec(dtype=["fp32", "float32"]),
        ("dtype[1]: 'float32' is given twice (also at [0])",)),
    Bad("pattern twice", spec(patterns=[LOCAL, LOCAL]),
        (f"patterns[1]: {LOCAL_LABEL} is given twice (also at [0])",)),
    Bad("patterns alike by label", spec(patterns=[
        {"type": "file", "block_size": 16, "path": "a/p.npy"},
        {"type": "file", "block_size": 16, "path": "b/p.npy"}]),
        ("patterns[1]:", "is given twice", "their case ids would collide")),
    Bad("provider twice", spec(providers=["sdpa_math", "sdpa_math"]),
        ("providers[1]: 'sdpa_math' is given twice",)),
    # impossible combinations
    Bad("heads not divisible by kv_heads", spec(heads=3, kv_heads=2),
        ("kv_heads: heads=3 is not divisible by kv_heads=2",)),
    Bad("q_len above seqlen", spec(q_len=64), ("q_len: q_len=64 exceeds seqlen=32",)),
    Bad("lengths with mode fwd", spec(batch=None, lengths=[16, 32]),
        ("lengths applies to the prefill_varlen and decode modes only",)),
    Bad("batch and batch_tokens", spec(batch_tokens=64),
        ("(top level): give exactly one of 'batch' and 'batch_tokens'",)),
    Bad("missing seqlen", spec(seqlen=None), ("seqlen: required key is missing",)),
    Bad("batch_tokens below seqlen", spec(batch=None, batch_tokens=16),
        ("batch_tokens: fewer tokens than seqlen=32 gives a batch of 0",)),
    Bad("decode bidirectional", spec(mode="decode", causal=False),
        ("causal: mode decode needs causal: true",)),
    # the file itself
    Bad("duplicate key", with_key_twice("seqlen: 64"),
        ("line 23: duplicate key 'seqlen' (first given on line 6)",)),
    Bad("duplicate nested key", text("name: tiny\ntiming:\n  rep_ms: 1\n  rep_ms: 2\n"),
        ("line 4: duplicate key 'rep_ms' (first given on line 3)",)),
    Bad("binary file", text(b"\x89PNG\r\n\x1a\n\x00\xff\xfe"),
        ("not a text file (byte 0x89 at offset 0 is not UTF-8)",)),
    Bad("a directory", directory, ("is a directory; give a spec file",)),
    Bad("empty file", text(""), ("a sweep spec is a YAML mapping of keys, got NoneType",)),
    Bad("a YAML list", text("- 1\n- 2\n"), ("a sweep spec is a YAML mapping of keys, got list",)),
    Bad("YAML syntax error", text("name: tiny\nseqlen: [32, 64\nheads: 2\n"),
        ("not valid YAML: line 3, column 6: did not find expected ',' or ']'",)),
    Bad("integer of 5000 digits", text(f"name: tiny\nseqlen: {'9' * 5000}\n"),
        ("not valid YAML:", "limit")),
    Bad("a null key", text(yaml.safe_dump(spec_dict(), sort_keys=False) + "null: 3\n"),
        ("(top level): the key null is not a name; keys are strings",)),
    Bad("a date for a name", spec(name=__import__("datetime").date(2024, 1, 1)),
        ("name: 2024-01-01 is not a string",)),
    Bad("local_blocks huge", spec(patterns=[{**LOCAL, "local_blocks": 10**30}]),
        ("patterns[0].local_stride.local_blocks: must be less than or equal to 16777216",)),
    # pattern files
    Bad("pattern file missing", pattern_file("nope.npy", None), ("does not exist",), "nope.npy"),
    Bad("npy of floats", pattern_file("p.npy", npy(lower(2, float))),
        ("holds float64 values; a pattern is bool or integer 0/1",), "p.npy"),
    Bad("npy holding a 2", pattern_file("p.npy", npy(lower(2, np.int64) * 2)),
        ("holds the value 2; a pattern holds only 0 and 1",), "p.npy"),
    Bad("npy of objects", pattern_file("p.npy", npy(np.array([{"a": 1}], dtype=object),
                                                    allow_pickle=True)),
        ("cannot be read as a .npy pattern", "allow_pickle"), "p.npy"),
    Bad("npy garbage", pattern_file("p.npy", raw(b"\x93NUMPY garbage")),
        ("cannot be read as a .npy pattern",), "p.npy"),
    Bad("pt of a dict", pattern_file("p.pt", torch_save({"pattern": torch.ones(2, 2)})),
        ("holds a dict, not an array",), "p.pt"),
    Bad("pt of a foreign class", pattern_file("p.pt", torch_save(NotATensor())),
        ("cannot be read as a .pt pattern",), "p.pt"),
    Bad("pt garbage", pattern_file("p.pt", raw(b"not a pickle at all")),
        ("cannot be read as a .pt pattern",), "p.pt"),
    Bad("pt empty", pattern_file("p.pt", raw(b"")), ("cannot be read as a .pt pattern",), "p.pt"),
    Bad("pt of floats", pattern_file("p.pt", torch_save(torch.ones(1, 2, 2))),
        ("holds torch.float32 values",), "p.pt"),
    Bad("pattern too small for seqlen", pattern_file("p.npy", npy(lower(2)), seqlen=[32, 64]),
        ("patterns: file(p.npy,bs16)", "too few for key length 64 (4 blocks needed)")),
    Bad("pattern of one dimension", pattern_file("p.npy", npy(np.ones(4, dtype=bool))),
        ("patterns: file(p.npy,bs16)", "pattern must have shape"), "p.npy"),
    Bad("pattern file of another kind", pattern_file("p.txt", raw(b"1 0\n1 1\n")),
        ("expected a .npy or .pt file",), "p.txt"),
    # settings that would do nothing, refused rather than ignored
    Bad("homo_head with per_kv_group", spec(patterns=[{**LOCAL, "homo_head": True,
                                                        "per_kv_group": True}]),
        ("patterns[0].local_stride: homo_head: true", "leaves per_kv_group nothing to do",
         "allowed: homo_head: true alone")),
    Bad("homo_head with head_sliding_step", spec(patterns=[{**LOCAL, "homo_head": True,
                                                             "head_sliding_step": 2}]),
        ("patterns[0].local_stride: homo_head: true", "leaves head_sliding_step nothing to do")),
    Bad("config with mode decode alone", spec(mode="decode", config={"block_m": 16,
                                                                     "block_n": 16}),
        ("config: pins the bundled kernel's forward launch config",
         "with mode decode alone it would do nothing", "allowed: config null")),
    Bad("bwd_block for forward-only flashinfer", spec(
        providers=["sdpa_math", "flashinfer"],
        provider_options={"flashinfer": {"bwd_block": [64, 64]}}),
        ("provider_options.flashinfer.bwd_block: unknown key", "allowed keys here: fwd_block")),
    Bad("exclude a misspelt mode", spec(exclude=[{"mode": "fwdd"}]),
        ("exclude[0].mode: 'fwdd' is not a mode a case can have; allowed: fwd, bwd",)),
    Bad("exclude causal as text", spec(exclude=[{"causal": "true"}]),
        ("exclude[0].causal: 'true' is not a causal a case can have; allowed: true, false",)),
    Bad("exclude a seqlen mapping", spec(exclude=[{"seqlen": [32, {"a": 1}]}]),
        ("exclude[0].seqlen[1]: {'a': 1} is not a seqlen a case can have; allowed: integers",)),
    Bad("exclude an unknown dtype", spec(exclude=[{"dtype": "fp4"}]),
        ("exclude[0].dtype: 'fp4' is not a dtype", "allowed: bf16")),
    Bad("exclude a pattern the spec lacks", spec(exclude=[{"pattern": "local_stride(bs16)"}]),
        ("exclude[0].pattern: 'local_stride(bs16)' is not a pattern",
         f"allowed: the spec's patterns' labels ({LOCAL_LABEL})")),
    Bad("exclude an empty list", spec(exclude=[{"heads": []}]),
        ("exclude[0].heads: an empty list",)),
    # values past any sense
    Bad("rep_ms of 1e300", spec(timing={"warmup_ms": 1, "rep_ms": 1e300}),
        ("timing.rep_ms: must be less than or equal to 60000", "got 1e+300")),
    Bad("warmup_ms of a day", spec(timing={"warmup_ms": 86_400_000, "rep_ms": 1}),
        ("timing.warmup_ms: must be less than or equal to 60000",)),
    Bad("rtol keyed by a number", text(yaml.safe_dump(spec_dict(), sort_keys=False)
                                       .replace("check:\n", "check:\n  rtol: {1: 0.1}\n")),
        ("check.rtol: the key 1 is not a name; keys are strings",)),
    Bad("a character device", lambda folder: Path("/dev/null"),
        ("not a regular file; give a spec file (YAML)",)),
]


@pytest.mark.parametrize("bad", SPECS, ids=[b.id for b in SPECS])
def test_bad_spec_exits_2(tmp_path: Path, bad: Bad) -> None:
    path = bad.make(tmp_path)
    result = invoke("validate", path)
    message = flat(result.stderr)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert message.startswith(f"error: {path}: "), message  # the spec file, first
    for phrase in bad.expect:
        assert phrase in message, message
    if bad.names:
        assert bad.names in message, message


FLAGS = [
    ("--only unknown key", ["--only", "colour=red"],
     "--only 'colour=red': expected KEY=VALUE with KEY one of mode, dtype"),
    ("--only without =", ["--only", "seqlen"], "--only 'seqlen': expected KEY=VALUE"),
    ("--only matching nothing", ["--only", "seqlen=96"], "--only seqlen=96: no case of"),
    ("--providers unknown", ["--providers", "sdpa_math,cutlass"],
     "--providers: unknown cutlass; allowed: dkbench"),
    ("--providers empty", ["--providers", ","],
     "--providers ',': name at least one provider; allowed: dkbench"),
    ("--device tpu", ["--device", "tpu"], "--device 'tpu': allowed values are auto, cuda, cpu"),
    ("--shard out of range", ["--shard", "0/2"], "--shard 0/2: I must be between 1 and N"),
    ("--shard not I/N", ["--shard", "x"], "--shard 'x': expected I/N"),
    ("--gpus garbage", ["--gpus", "xyz"], "--gpus 'xyz': expected all, GPU indices"),
    ("--resume not a run", ["--resume", "{tmp}/nowhere"], "--resume {tmp}/nowhere: not a run "
     "directory"),
]


@pytest.mark.parametrize(("args", "message"), [f[1:] for f in FLAGS], ids=[f[0] for f in FLAGS])
def test_bad_flag_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    device = [] if "--device" in args else ["--device", "cpu"]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke("run", write_spec(tmp_path), *device, "--out", out, "-q", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert message.replace("{tmp}", str(tmp_path)) in flat(result.stderr), result.output
    assert not out.exists()  # nothing ran


def test_run_refuses_a_layout_past_the_int32_block_count(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write_spec(tmp_path, seqlen=800_000, patterns=[{"type": "dense", "block_size": 16}])
    result = invoke("run", path, "--device", "cpu", "--out", out, "-q")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert (f"error: {path}: patterns: dense(bs16) at seqlen=800000 is 50000 blocks a side; "
            "allowed: at most 46340") in flat(result.stderr), result.output
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "validate"])
def test_missing_spec_path_exits_2(tmp_path: Path, command: str) -> None:
    path = tmp_path / "absent.yaml"
    extra = ["--device", "cpu", "--out", tmp_path / "out"] if command == "run" else []
    result = invoke(command, path, *extra)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert f"{path}: no such spec file" in flat(result.stderr), result.output


def test_corpus_size() -> None:
    assert len(SPECS) + len(FLAGS) + 2 >= 40
