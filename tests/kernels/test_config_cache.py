"""The best-config cache: keys, buckets, memoised lookup, locked atomic writes, bad files."""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.synchronize
import warnings
from dataclasses import replace
from pathlib import Path

import platformdirs
import pytest

from kernels import config_cache
from kernels.config_cache import (
    ENV_VAR,
    FORMAT_VERSION,
    CacheFormatError,
    CacheKey,
    ConfigCache,
    ConfigCacheWarning,
    default_cache_path,
    density_bucket,
    load_shipped,
    seqlen_bucket,
    source_hash,
)
from tests.cache_keys import CONFIG, make_key


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


# -- keys and buckets --


@pytest.mark.parametrize(
    "seqlen, bucket", [(1, 1), (2, 2), (3, 4), (1000, 1024), (1024, 1024), (1025, 2048)]
)
def test_seqlen_bucket(seqlen: int, bucket: int) -> None:
    assert seqlen_bucket(seqlen) == bucket


@pytest.mark.parametrize(
    "density, bucket",
    [(0.151, 0.2), (0.324, 0.35), (0.35, 0.35), (0.55, 0.55), (0.6, 0.6), (0.05, 0.05),
     (0.0, 0.05), (0.951, 1.0), (1.0, 1.0), (1.3, 1.0)],
)
def test_density_bucket(density: float, bucket: float) -> None:
    assert density_bucket(density) == bucket


@pytest.mark.parametrize("bad", [0, -3])
def test_seqlen_bucket_rejects_nonpositive(bad: int) -> None:
    with pytest.raises(ValueError, match="seqlen"):
        seqlen_bucket(bad)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_density_bucket_rejects_bad(bad: float) -> None:
    with pytest.raises(ValueError, match="density"):
        density_bucket(bad)


def test_key_string_is_stable_and_round_trips() -> None:
    key = make_key()
    assert key.as_str() == (
        "NVIDIA H100 80GB HBM3|9.0|3.6.0|fwd|ab12cd34|bfloat16|d128|bs64|s8192|p0.35"
    )
    assert CacheKey.from_dict(key.to_dict()) == key
    # Float noise in the bucket must not make a second entry for the same problem.
    assert make_key(density_bucket=0.35000000000000003).as_str() == key.as_str()


def test_a_key_of_owned_steps_is_another_entry_and_old_keys_read_as_union() -> None:
    union, owned = make_key(), make_key(steps="owned")
    assert union.steps == "union"
    assert owned.as_str() == union.as_str() + "|owned"
    assert CacheKey.from_dict(owned.to_dict()) == owned
    # A key written before the field existed has no "steps": it is the union's, as it was.
    old = {name: value for name, value in union.to_dict().items() if name != "steps"}
    assert CacheKey.from_dict(old) == union
    with pytest.raises(ValueError, match="steps must be one of union, owned"):
        make_key(steps="halves")


def test_key_from_dict_rejects_missing_and_wrong_types() -> None:
    d = make_key().to_dict()
    del d["dtype"]
    with pytest.raises(ValueError, match="dtype"):
        CacheKey.from_dict(d)
    with pytest.raises(ValueError, match="head_dim"):
        CacheKey.from_dict({**make_key().to_dict(), "head_dim": "128"})


def test_source_hash_tracks_source() -> None:
    def a(x: int) -> int:
        return x + 1

    def b(x: int) -> int:
        return x + 2

    assert source_hash(a) == source_hash(a)
    assert len(source_hash(a)) == 8
    assert source_hash(a) != source_hash(b)
    assert source_hash(a, b) != source_hash(b, a)


def test_source_hash_falls_back_to_module_file() -> None:
    # A function made by exec has no retrievable source; its module file is hashed instead.
    namespace: dict = {"__name__": __name__}
    exec("def f():\n    return 1\n", namespace)
    assert source_hash(namespace["f"]) == source_hash(Path(__file__).read_bytes())


def test_source_hash_of_triton_kernel() -> None:
    triton = pytest.importorskip("triton")

    # `inspect.getsource` rejects a JITFunction; the hash must come from the kernel's own source,
    # not from the whole test file (the fallback), so two kernels here must hash apart.
    @triton.jit
    def k1(x):
        pass

    @triton.jit
    def k2(x):
        x = x + 1

    assert source_hash(k1) == source_hash(k1.fn)
    assert source_hash(k1) != source_hash(k2)


# -- round trip and memo --


def test_put_then_get_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "configs.json"
    ConfigCache(path).put(make_key(), CONFIG, ms=0.4, default_ms=0.5)
    fresh = ConfigCache(path)
    assert fresh.get(make_key()) == CONFIG
    assert fresh.get(make_key(head_dim=64)) is None
    entry = fresh.entry(make_key())
    assert entry is not None
    assert (entry["ms"], entry["default_ms"], entry["source"]) == (0.4, 0.5, "tune")
    assert entry["key"] == make_key().to_dict()
    assert "T" in entry["tuned_at"]
    on_disk = json.loads(path.read_text())
    assert on_disk["format"] == FORMAT_VERSION
    assert list(on_disk["entries"]) == [make_key().as_str()]


def test_get_on_missing_file_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "configs.json"
    assert ConfigCache(path).get(make_key()) is None
    assert list(tmp_path.iterdir()) == []


def test_put_rejects_incomplete_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_stages"):
        ConfigCache(tmp_path / "c.json").put(
            make_key(), {"block_m": 64, "block_n": 64, "num_warps": 4}, ms=1.0, default_ms=1.0
        )


def test_get_returns_a_copy(tmp_path: Path) -> None:
    cache = ConfigCache(tmp_path / "c.json")
    cache.put(make_key(), CONFIG, ms=1.0, default_ms=1.0)
    cache.get(make_key())["num_warps"] = 99  # type: ignore[index]
    assert cache.get(make_key()) == CONFIG


def test_get_is_memoised_and_sees_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.json"
    reads: list[Path] = []
    real_read = config_cache._read_file

    def counting_read(p: Path):  # noqa: ANN202
        reads.append(p)
        return real_read(p)

    monkeypatch.setattr(config_cache, "_read_file", counting_read)
    cache = ConfigCache(path)
    cache.put(make_key(), CONFIG, ms=1.0, default_ms=2.0)
    reads.clear()
    assert cache.get(make_key()) == CONFIG
    assert len(reads) == 1
    for _ in range(5):
        assert cache.get(make_key()) == CONFIG
    assert len(reads) == 1, "a repeated lookup re-read the file"

    # Another writer (another process, in real life) changes the file: the memo notices.
    other = {**CONFIG, "num_warps": 8}
    ConfigCache(path).put(make_key(kernel="bwd"), other, ms=1.0, default_ms=2.0)
    assert cache.get(make_key(kernel="bwd")) == other
    # And the writer's own memo is refreshed by its put.
    cache.put(make_key(kernel="decode"), CONFIG, ms=1.0, default_ms=2.0)
    assert cache.get(make_key(kernel="decode")) == CONFIG


def test_clear(tmp_path: Path) -> None:
    cache = ConfigCache(tmp_path / "c.json")
    for d in (64, 128):
        cache.put(make_key(head_dim=d), CONFIG, ms=1.0, default_ms=1.0)
    assert cache.clear() == 2
    assert cache.entries() == {}
    assert ConfigCache(cache.path).entries() == {}
    assert cache.clear() == 0


# -- concurrency --


def _put_many(path: str, kernel: str, n: int, start: multiprocessing.synchronize.Barrier) -> None:
    cache = ConfigCache(path)
    # Both writers start their loops together, so their puts really interleave.
    start.wait(timeout=60)
    for i in range(n):
        cache.put(make_key(kernel=kernel, head_dim=16 + i), CONFIG, ms=1.0, default_ms=1.0)


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_put_many, args=(str(path), k, 20, start)) for k in ("fwd", "bwd")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"writer exited with {p.exitcode}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt file would warn
        entries = ConfigCache(path).entries()
    expected = {make_key(kernel=k, head_dim=16 + i).as_str() for k in ("fwd", "bwd")
                for i in range(20)}
    assert set(entries) == expected
    leftovers = {p.name for p in tmp_path.iterdir()} - {"c.json", "c.json.lock"}
    assert not leftovers, "temporary files were left behind"


# -- bad files --


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"format": 2, "entries": {}}), json.dumps([1, 2]),
     json.dumps({"format": 1, "entries": {"x": {"key": {}, "config": {}}}})],
    ids=["corrupt", "foreign-format", "not-an-object", "bad-entry"],
)
def test_bad_file_is_reported_once_and_left_as_it_is(tmp_path: Path, content: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    cache = ConfigCache(path)
    with pytest.warns(ConfigCacheWarning, match="c.json") as record:
        assert cache.get(make_key()) is None
    assert len(record) == 1 and "it is left as it is" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: the next lookup is silent
        assert cache.get(make_key()) is None
    assert path.read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]  # nothing made beside it


def test_put_over_a_bad_file_is_refused_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write_json(path, {"format": 99, "entries": {}})
    before = path.read_bytes()
    with pytest.raises(CacheFormatError, match=r"c\.json: not a usable config cache \(cache "
                                               r"format 99, this version reads format 1\)"):
        ConfigCache(path).put(make_key(), CONFIG, ms=1.0, default_ms=1.0)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
    path.unlink()  # once it is gone, the put goes through
    ConfigCache(path).put(make_key(), CONFIG, ms=1.0, default_ms=1.0)
    assert ConfigCache(path).get(make_key()) == CONFIG


# -- location --


def test_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_cache_path() == Path(platformdirs.user_cache_dir("dkbench")) / "configs.json"
    env_path = tmp_path / "env.json"
    monkeypatch.setenv(ENV_VAR, str(env_path))
    assert default_cache_path() == env_path
    assert ConfigCache().path == env_path
    explicit = tmp_path / "explicit.json"
    assert ConfigCache(explicit).path == explicit
    ConfigCache().put(make_key(), CONFIG, ms=1.0, default_ms=1.0)
    assert env_path.exists() and not explicit.exists()


# -- export, import, shipped --


def test_export_import_round_trip(tmp_path: Path) -> None:
    src = ConfigCache(tmp_path / "a.json")
    for d in (32, 64, 128):
        src.put(make_key(head_dim=d), CONFIG, ms=1.0, default_ms=2.0)
    assert src.export(tmp_path / "out.json") == 3

    dst = ConfigCache(tmp_path / "b.json")
    mine = {**CONFIG, "num_stages": 1}
    dst.put(make_key(head_dim=64), mine, ms=0.5, default_ms=2.0)
    assert dst.import_(tmp_path / "out.json", overwrite=False) == 2
    assert dst.get(make_key(head_dim=64)) == mine
    assert dst.import_(tmp_path / "out.json") == 3
    assert dst.entries() == src.entries()


@pytest.mark.parametrize(
    "content",
    [None, "{not json", json.dumps({"format": 2, "entries": {}}),
     json.dumps({"format": 1, "entries": {"k": {"key": make_key().to_dict(), "config": {},
                                               "ms": 1.0, "default_ms": 1.0}}})],
    ids=["missing", "corrupt", "foreign-format", "bad-config"],
)
def test_import_of_a_bad_file_raises(tmp_path: Path, content: str | None) -> None:
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    cache = ConfigCache(tmp_path / "c.json")
    cache.put(make_key(), CONFIG, ms=1.0, default_ms=1.0)
    with pytest.raises(ValueError, match="bad.json"):
        cache.import_(bad)
    assert bad.exists() == (content is not None), "import must not move the source aside"
    assert list(cache.entries()) == [make_key().as_str()]


def test_load_shipped(tmp_path: Path) -> None:
    assert load_shipped(tmp_path / "h100.json") == {}
    cache = ConfigCache(tmp_path / "h100.json")
    cache.put(make_key(), CONFIG, ms=1.0, default_ms=1.0)
    assert load_shipped(cache.path) == cache.entries()

    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.warns(ConfigCacheWarning, match="broken.json"):
        assert load_shipped(broken) == {}
    assert broken.exists(), "shipped files are read-only, never set aside"


def test_hand_edited_key_string_is_rederived(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    entry = {"key": make_key().to_dict(), "config": CONFIG, "ms": 1.0, "default_ms": 1.0}
    write_json(path, {"format": 1, "entries": {"whatever": entry}})
    assert ConfigCache(path).get(make_key()) == CONFIG
    assert ConfigCache(path).get(replace(make_key(), kernel="bwd")) is None


# -- checking a write before long work --


def test_check_writable_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"{blocker / 'c.json'}.*{blocker} is not a directory"):
        ConfigCache(blocker / "c.json").check_writable()

    # chmod does not stop root (CI), so the unwritable directory is simulated.
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k:
                        False if Path(p) == locked else real(p, mode, *a, **k))
    with pytest.raises(PermissionError, match=f"{locked / 'sub' / 'c.json'}.*not writable"):
        ConfigCache(locked / "sub" / "c.json").check_writable()
    assert not (locked / "sub").exists()

    fine = ConfigCache(tmp_path / "new" / "c.json")
    fine.check_writable()
    assert fine.entries() == {} and not fine.path.exists()


def test_cache_format_error_pickles_with_its_stamp(tmp_path: Path) -> None:
    import pickle

    err = config_cache.CacheFormatError(tmp_path / "c.json", "not valid JSON", (1, 2, 3))
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, back.stamp, str(back)) == (err.path, err.reason, err.stamp,
                                                               str(err))
