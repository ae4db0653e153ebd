"""`dkbench cache ...` given files that hand edits, scripts and slips produce: each is refused by
name (exit 2) or handled, never a traceback, never an entry lost or changed without a word."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import filelock
import pytest
import typer
from typer.testing import CliRunner, Result

import kernels.config_cache as config_cache
from dkbench.commands.cache import cache_app
from kernels.config_cache import ENV_VAR, ConfigCache
from tests.cache_keys import CONFIG, make_key


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(cache_app, name="cache")
    return app


def invoke(app: typer.Typer, *args: object) -> Result:
    env = {"COLUMNS": "250", ENV_VAR: None}
    return CliRunner().invoke(app, ["cache", *map(str, args)], env=env)


def flat(text: str) -> str:
    return " ".join(text.split())


def entry(**overrides: Any) -> dict[str, Any]:
    key = {**make_key().to_dict(), **overrides.pop("key", {})}
    return {"key": key, "config": CONFIG, "ms": 1.0, "default_ms": 2.0, **overrides}


def write(path: Path, *entries: dict[str, Any], text: str | None = None) -> Path:
    body = {f"e{i}": e for i, e in enumerate(entries)}
    path.write_text(text if text is not None else json.dumps({"format": 1, "entries": body}))
    return path


def assert_refused(r: Result, *words: str) -> None:
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit), r.output  # a handled error, not a crash
    message = flat(r.stderr)
    assert message.startswith("error:"), r.output
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


@pytest.fixture
def cache(tmp_path: Path) -> ConfigCache:
    cache = ConfigCache(tmp_path / "configs.json")
    cache.put(make_key(), CONFIG, ms=0.4, default_ms=0.5)
    return cache


# -- times and key fields no tuner writes ------------------------------------------------------

BAD_TIMES = {
    "ms-too-big-for-a-float": ({"ms": 10**400}, "ms must be a finite number >= 0"),
    "default-too-big-for-a-float": ({"default_ms": 10**400},
                                    "default_ms must be a finite number >= 0 or null"),
    "ms-nan": ({"ms": math.nan}, "ms must be a finite number >= 0, got nan"),
    "ms-infinity": ({"ms": math.inf}, "ms must be a finite number >= 0, got inf"),
    "ms-negative": ({"ms": -1.0}, "ms must be a finite number >= 0, got -1.0"),
    "default-nan": ({"default_ms": math.nan}, "or null, got nan"),
}


@pytest.mark.parametrize("kind", BAD_TIMES)
def test_import_refuses_a_time_no_measurement_gives(app: typer.Typer, cache: ConfigCache,
                                                    tmp_path: Path, kind: str) -> None:
    """Was: imported (NaN written back into the cache as no JSON; a huge int then crashed
    `show` with an OverflowError traceback)."""
    overrides, reason = BAD_TIMES[kind]
    src = write(tmp_path / "incoming.json", entry(**overrides))
    r = invoke(app, "import", src, "--cache", cache.path)
    assert_refused(r, str(src), "entry 'e0'", reason)
    assert list(ConfigCache(cache.path).entries()) == [make_key().as_str()]


def test_show_of_a_cache_with_a_huge_time_warns_and_leaves_it(app: typer.Typer,
                                                              tmp_path: Path) -> None:
    """Was: `show` died with an OverflowError traceback (exit 1)."""
    path = write(tmp_path / "configs.json", entry(ms=10**400))
    before = path.read_bytes()
    r = invoke(app, "show", "--cache", path)
    assert r.exit_code == 0 and r.exception is None, r.output
    assert "warning:" in r.stderr and str(path) in flat(r.stderr), r.output
    assert "ms must be a finite number" in flat(r.stderr)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.glob("configs.json*")] == ["configs.json"]


BAD_KEYS = {
    "negative-head-dim": ({"head_dim": -5}, "key['head_dim'] must be a positive int, got -5"),
    "zero-seqlen": ({"seqlen_bucket": 0}, "key['seqlen_bucket'] must be a positive int"),
    "nan-density": ({"density_bucket": math.nan}, "must be a number in (0, 1], got nan"),
    "density-above-one": ({"density_bucket": 3.5}, "must be a number in (0, 1], got 3.5"),
    "density-too-big-for-a-float": ({"density_bucket": 10**400},
                                    "key['density_bucket'] must be a number in (0, 1]"),
    # Was: imported, and never looked up (seqlen_bucket rounds up to a power of two).
    "seqlen-not-a-power-of-two": ({"seqlen_bucket": 1000},
                                  "key['seqlen_bucket'] must be a power of two"),
    # Was: imported, and never looked up (density_bucket rounds 0.33 up to 0.35).
    "density-not-a-bucket": ({"density_bucket": 0.33},
                             "key['density_bucket'] must be a multiple of 0.05 (as density_bucket "
                             "makes it), got 0.33"),
}


@pytest.mark.parametrize("kind", BAD_KEYS)
def test_import_refuses_a_key_no_bucket_makes(app: typer.Typer, cache: ConfigCache,
                                              tmp_path: Path, kind: str) -> None:
    """Was: imported and shown as ``d-5`` or ``pnan`` (a huge density: refused, but without
    naming the field)."""
    fields, reason = BAD_KEYS[kind]
    src = write(tmp_path / "incoming.json", entry(key=fields))
    r = invoke(app, "import", src, "--cache", cache.path)
    assert_refused(r, str(src), "entry 'e0'", reason)
    assert list(ConfigCache(cache.path).entries()) == [make_key().as_str()]


def test_a_put_the_reader_would_refuse_raises_and_writes_nothing(cache: ConfigCache) -> None:
    """Was: written, NaN and all; a reader that refuses it sets the whole file aside."""
    before = cache.path.read_bytes()
    with pytest.raises(ValueError, match=r"cannot cache .*d64.*ms must be a finite number"):
        cache.put(make_key(head_dim=64), CONFIG, ms=math.nan, default_ms=1.0)
    with pytest.raises(ValueError, match=r"density_bucket'\] must be a number in \(0, 1\]"):
        cache.put(make_key(density_bucket=0.0), CONFIG, ms=1.0, default_ms=1.0)
    assert cache.path.read_bytes() == before
    cache.put(make_key(head_dim=64), CONFIG, ms=1.0, default_ms=math.nan)  # a failed default
    assert ConfigCache(cache.path).entry(make_key(head_dim=64))["default_ms"] is None


# -- JSON that would silently lose entries -------------------------------------------------------


def test_import_refuses_a_name_given_twice(app: typer.Typer, cache: ConfigCache,
                                           tmp_path: Path) -> None:
    """Was: json kept the last "entries" only: "imported 0 entries", every entry of the file
    dropped without a word."""
    one = json.dumps({"e0": entry(key={"head_dim": 64})})
    src = tmp_path / "incoming.json"
    src.write_text(f'{{"format": 1, "entries": {one}, "entries": {{}}}}')
    r = invoke(app, "import", src, "--cache", cache.path)
    assert_refused(r, str(src), "the name 'entries' appears twice")
    same_name = f'{{"format": 1, "entries": {{"a": {json.dumps(entry())}, "a": {json.dumps(entry())}}}}}'
    src.write_text(same_name)
    assert_refused(invoke(app, "import", src, "--cache", cache.path), "the name 'a' appears twice")


def test_import_refuses_two_entries_with_the_same_key_fields(app: typer.Typer, cache: ConfigCache,
                                                            tmp_path: Path) -> None:
    """Was: the re-derived key strings collided and the first entry was dropped without a word."""
    src = write(tmp_path / "incoming.json", entry(ms=1.0), entry(ms=9.0))
    r = invoke(app, "import", src, "--cache", cache.path)
    assert_refused(r, str(src), "entries 'e0' and 'e1' have the same key fields")
    assert ConfigCache(cache.path).entry(make_key())["ms"] == 0.4


def test_unknown_top_level_fields_are_refused_not_dropped(app: typer.Typer, cache: ConfigCache,
                                                          tmp_path: Path) -> None:
    """Was: imported, and any write of a cache holding one dropped it without a word."""
    src = tmp_path / "incoming.json"
    src.write_text(json.dumps({"format": 1, "entries": {}, "note": "from the H100 box"}))
    r = invoke(app, "import", src, "--cache", cache.path)
    assert_refused(r, str(src), "unknown top-level field(s) 'note'", "'format' and 'entries'")


# -- show: text from the file is shown, never run by the terminal ------------------------------


def test_show_writes_control_characters_and_lone_surrogates_as_escapes(app: typer.Typer,
                                                                       tmp_path: Path) -> None:
    """Was: a terminal escape in a key field went to the terminal as it was (``\\x1b[2J`` clears
    the screen), and a lone surrogate (JSON ``\\ud800``) crashed `show` with UnicodeEncodeError."""
    path = tmp_path / "configs.json"
    text = json.dumps({"format": 1, "entries": {"e": entry(key={"gpu": "GPU\x1b[2J\nX"})}})
    path.write_text(text.replace("bfloat16", "bfloat16\\ud800"))
    r = invoke(app, "show", "--cache", path)
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout
    assert "GPU\\x1b[2J\\nX" in r.stdout and "bfloat16\\ud800" in r.stdout, r.stdout


# -- export and import: the cache file itself --------------------------------------------------


@pytest.mark.parametrize("dest", ["itself", "spelled-otherwise", "symlink", "lock-file"])
def test_export_refuses_the_cache_itself_and_its_lock_file(app: typer.Typer, cache: ConfigCache,
                                                           tmp_path: Path, dest: str) -> None:
    """Was: written over the cache without its lock (a tuner's concurrent write could be lost),
    or over its lock file (two writers could then both hold "the" lock)."""
    target = {"itself": cache.path,
              "spelled-otherwise": tmp_path / "sub" / ".." / "configs.json",
              "symlink": tmp_path / "link.json",
              "lock-file": Path(f"{cache.path}.lock")}[dest]
    if dest == "symlink":
        target.symlink_to(cache.path)
    before = cache.path.read_bytes()
    r = invoke(app, "export", target, "--cache", cache.path)
    what = "lock file" if dest == "lock-file" else "the config cache itself"
    assert_refused(r, str(target), what, "export to another file")
    assert cache.path.read_bytes() == before
    assert not (tmp_path / "sub").exists()


def test_import_says_what_it_replaced_kept_and_found_unchanged(app: typer.Typer,
                                                               cache: ConfigCache,
                                                               tmp_path: Path) -> None:
    """Was: "imported 2 entries" whether it replaced a cached entry, found it as it was, or (with
    --keep-existing) kept a different one: nothing said which."""
    other = ConfigCache(tmp_path / "other.json")
    other.put(make_key(), {**CONFIG, "num_stages": 1}, ms=0.1, default_ms=0.5)  # differs
    other.put(make_key(head_dim=64), CONFIG, ms=1.0, default_ms=2.0)  # new
    src = tmp_path / "incoming.json"
    other.export(src)
    cache.put(make_key(head_dim=32), CONFIG, ms=1.0, default_ms=2.0)
    ConfigCache(tmp_path / "third.json").export(tmp_path / "empty.json")

    r = invoke(app, "import", src, "--keep-existing", "--cache", cache.path)
    assert r.exit_code == 0, r.output
    assert flat(r.stdout) == (f"imported 1 entry into {cache.path} (1 new; 1 cached "
                              "differently, kept as --keep-existing asks)")
    assert cache.get(make_key()) == CONFIG

    r = invoke(app, "import", src, "--cache", cache.path)
    assert r.exit_code == 0, r.output
    assert flat(r.stdout) == (f"imported 2 entries into {cache.path} (1 replaced what was "
                              "cached; 1 already cached as in the file)")
    assert cache.get(make_key()) == {**CONFIG, "num_stages": 1}


def test_importing_the_cache_into_itself_changes_nothing_and_says_so(app: typer.Typer,
                                                                     cache: ConfigCache) -> None:
    """Was: "imported 1 entries", and the file rewritten (a new inode) for nothing."""
    inode = os.stat(cache.path).st_ino
    r = invoke(app, "import", cache.path, "--cache", cache.path)
    assert r.exit_code == 0, r.output
    assert flat(r.stdout) == f"imported 1 entry into {cache.path} (1 already cached as in the file)"
    assert os.stat(cache.path).st_ino == inode


# -- the lock, and counts of one -----------------------------------------------------------------


def test_a_lock_held_elsewhere_is_reported_with_the_cache_and_the_wait(
        app: typer.Typer, cache: ConfigCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: "error: The file lock '...configs.json.lock' could not be acquired." (filelock's
    message: no cache named, no wait, no hint)."""
    monkeypatch.setattr(config_cache, "_LOCK_TIMEOUT_S", 0.2)
    holder = filelock.FileLock(f"{cache.path}.lock", is_singleton=False)
    with holder:
        r = invoke(app, "clear", "--yes", "--cache", cache.path)
    assert_refused(r, f"cannot write the config cache {cache.path}",
                   "another process has held its lock", "for 0.2 s")
    assert len(ConfigCache(cache.path).entries()) == 1


def test_a_count_of_one_says_entry(app: typer.Typer, cache: ConfigCache, tmp_path: Path) -> None:
    """Was: "1 entries" in every message."""
    r = invoke(app, "show", "--cache", cache.path)
    assert f"1 entry in {cache.path}" in flat(r.stdout), r.output
    r = invoke(app, "export", tmp_path / "out.json", "--cache", cache.path)
    assert flat(r.stdout) == f"exported 1 entry to {tmp_path / 'out.json'}"
    r = invoke(app, "clear", "--yes", "--cache", cache.path)
    assert flat(r.stdout) == f"removed 1 entry from {cache.path}"


# -- cache paths that can never be a cache file ------------------------------------------------

TOO_LONG = "a" * 300 + ".json"  # one name over the 255 bytes a file name may have


@pytest.mark.parametrize("command", ["show", "path", "clear -y", "export OUT", "import SRC"])
def test_a_cache_path_too_long_is_refused_with_the_limits(app: typer.Typer, cache: ConfigCache,
                                                          tmp_path: Path, command: str) -> None:
    """Was: show, clear and export warned, said "no entries" and exited 0; path printed it; import
    said only "[Errno 36] File name too long"."""
    args = [{"OUT": tmp_path / "out.json", "SRC": cache.path}.get(a, a) for a in command.split()]
    long = tmp_path / TOO_LONG
    r = invoke(app, *args, "--cache", long)
    assert_refused(r, str(long), "File name too long", "allowed: file names of at most 255 bytes")
    assert not (tmp_path / "out.json").exists()


def test_an_import_file_too_long_is_refused_with_the_limits(app: typer.Typer, cache: ConfigCache,
                                                            tmp_path: Path) -> None:
    """Was: "error: [Errno 36] File name too long: '...'", no limits named."""
    r = invoke(app, "import", tmp_path / TOO_LONG, "--cache", cache.path)
    assert_refused(r, TOO_LONG, "allowed: file names of at most 255 bytes")


@pytest.mark.parametrize("command", ["show", "path", "clear -y", "export OUT"])
@pytest.mark.parametrize("place", ["fifo", "directory", "under-a-file"])
def test_a_cache_path_that_is_no_file_is_refused(app: typer.Typer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, command: str,
                                                 place: str) -> None:
    """Was: a warning, "no entries" (export: an empty export file written) and exit 0. The
    directory comes through $DKBENCH_CACHE, which the --cache flag's own check never sees."""
    path = tmp_path / "c.json"
    if place == "fifo":
        os.mkfifo(path)
    elif place == "directory":
        path.mkdir()
    else:
        path.write_text("{}")
        path = path / "configs.json"
    monkeypatch.setenv(ENV_VAR, str(path))
    out = tmp_path / "out.json"
    args = [str(out) if a == "OUT" else a for a in command.split()]
    r = CliRunner().invoke(app, ["cache", *args], env={"COLUMNS": "250"})
    why = {"fifo": f"{path} is not a regular file (a device, a fifo or a socket)",
           "directory": f"{path} is a directory, not a cache file",
           "under-a-file": f"cannot use the config cache {path}: {path.parent} is not a "
                           "directory"}
    assert_refused(r, why[place])
    assert not out.exists()


def test_show_keeps_a_huge_time_and_an_overflowing_speedup_in_their_columns(
        app: typer.Typer, tmp_path: Path) -> None:
    """Was: a default_ms of 1e308 printed as 309 digits (the table's other columns squeezed to
    nothing), and a speedup that overflowed the division printed as "infx"."""
    path = write(tmp_path / "configs.json", entry(ms=5e-324, default_ms=1e308))
    r = invoke(app, "show", "--cache", path)
    assert r.exit_code == 0, r.output
    (row,) = [line.split() for line in r.stdout.splitlines() if "ab12cd34" in line]
    assert row[-2:] == ["1.000e+308", "-"], r.stdout


UNUSABLE = {
    "unknown-kernel": ({"key": {"kernel": "bogus"}},
                       "key['kernel'] must be one of fwd, bwd, dq, varlen, decode, fp8, "
                       "got 'bogus'"),
    "owned-dkdv": ({"key": {"kernel": "bwd", "steps": "owned"}},
                   "key['steps'] is 'owned', but only fwd, dq have that form; a bwd key's is "
                   "'union'"),
    "fused-forward": ({"config": {**CONFIG, "impl": "fused"}},
                      "its config cannot run: impl='fused' is the backward's dk/dv kernel only"),
    "block-m-not-a-tile": ({"config": {**CONFIG, "block_m": 3}},
                           "its config cannot run: block_m=3 must be a power of two >= 16"),
    "1000-stages": ({"config": {**CONFIG, "num_stages": 1000}},
                    "its config cannot run: num_stages=1000 must be 1 to 8"),
}


@pytest.mark.parametrize("kind", UNUSABLE)
def test_import_refuses_an_entry_no_launch_would_use(app: typer.Typer, cache: ConfigCache,
                                                     tmp_path: Path, kind: str) -> None:
    """Was: "imported 1 entry (1 new)", an entry every lookup skips without a word."""
    overrides, reason = UNUSABLE[kind]
    src = write(tmp_path / "incoming.json", entry(**overrides))
    r = invoke(app, "import", src, "--cache", cache.path)
    assert_refused(r, str(src), reason)
    assert list(ConfigCache(cache.path).entries()) == [make_key().as_str()]
    assert json.loads(src.read_text())["entries"]["e0"] == entry(**overrides)  # left as it was


@pytest.mark.parametrize("command", ["show", "clear -y", "export OUT", "import SRC"])
def test_a_long_path_in_a_summary_line_stays_whole(cache: ConfigCache, tmp_path: Path,
                                                   app: typer.Typer, command: str) -> None:
    """Was: folded at the terminal's width, so a path copied from the line had newlines in it."""
    long = tmp_path / ("d" * 120) / ("e" * 120 + ".json")
    ConfigCache(long).put(make_key(), CONFIG, ms=0.4, default_ms=0.5)
    out = tmp_path / ("o" * 150 + ".json")
    args = [{"OUT": out, "SRC": cache.path}.get(a, a) for a in command.split()]
    r = CliRunner().invoke(app, ["cache", *map(str, args), "--cache", str(long)],
                           env={"COLUMNS": "80", ENV_VAR: None})
    assert r.exit_code == 0, r.output
    assert str(out if command.startswith("export") else long) in r.stdout.splitlines()[0]


@pytest.mark.parametrize("command", ["show", "path", "clear -y", "export OUT", "import SRC"])
@pytest.mark.parametrize("through", ["flag", "environment"])
def test_a_cache_path_of_a_user_that_does_not_exist_is_refused(
        app: typer.Typer, cache: ConfigCache, tmp_path: Path, command: str, through: str) -> None:
    """Was: a RuntimeError traceback ("Could not determine home directory"), exit 1."""
    given = "~no-such-user-dkbench/configs.json"
    args = [{"OUT": tmp_path / "out.json", "SRC": cache.path}.get(a, a) for a in command.split()]
    flag = ["--cache", given] if through == "flag" else []
    r = CliRunner().invoke(app, ["cache", *map(str, args), *flag],
                           env={"COLUMNS": "250", ENV_VAR: given})
    assert_refused(r, f"cannot use the config cache {given}: its ~ names no user here")
    assert not (tmp_path / "out.json").exists()
