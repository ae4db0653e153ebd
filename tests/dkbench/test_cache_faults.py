"""Bad best-config cache files, whoever reads them: the lookup at launch, `run` and `cache show`
report the file by path and carry on without it; every write (`tune`, `cache clear|import`)
refuses it by path; nothing ever moves, renames or writes beside it (the path may name anyone's
file). `tune` checks the cache and OUT can be written before it times anything; `tune --help`
reads well at 80 columns.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner, Result

import kernels.select as select
from dkbench.commands.cache import cache_app
from dkbench.commands.tune import prose_help
from dkbench.measure import runner
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand
from kernels import BlockLayout
from kernels.config_cache import (
    ENV_VAR,
    CacheFormatError,
    CacheKey,
    ConfigCache,
    ConfigCacheWarning,
)
from kernels.layout import local_stride_layout
from tests.cache_keys import CONFIG, make_key
from tests.dkbench import specs
from tests.dkbench.test_tune import (  # noqa: F401 - fake_kernel: fixture
    fake_kernel,
    tune_app,
    write_spec,
)

CPU = torch.device("cpu")


def good_text() -> str:
    entry = {"key": make_key().to_dict(), "config": CONFIG, "ms": 1.0, "default_ms": 2.0}
    return json.dumps({"format": 1, "entries": {make_key().as_str(): entry}}, indent=1)


# -- every kind of unreadable file -----------------------------------------------------------------

# name -> bytes to write where the cache file should be.
BAD: dict[str, bytes] = {
    "random-bytes": b"\xff\xfe\x80" + bytes(random.Random(0).randrange(256) for _ in range(2048)),
    "latin-1": good_text().replace("H100", "H100 \u00e9").encode("latin-1"),
    "utf-16": good_text().encode("utf-16"),
    "truncated": good_text().encode()[: len(good_text()) // 2],
    "empty": b"",
    "a-list": b"[1, 2]",
    "entries-a-list": json.dumps({"format": 1, "entries": []}).encode(),
    "format-true": json.dumps({"format": True, "entries": {}}).encode(),
    "ms-a-string": good_text().replace('"ms": 1.0', '"ms": "fast"').encode(),
    "nested-too-deep": b"[" * 100_000,
}


def make_bad(path: Path, kind: str) -> None:
    path.write_bytes(BAD[kind])


def make_directory(path: Path) -> None:
    """A directory where the cache file should be (DKBENCH_CACHE=$HOME, say)."""
    path.mkdir()
    (path / "inside.txt").write_text("kept")


def assert_untouched(path: Path, kind: str) -> None:
    """The bad file is where it was, bytes and all, with nothing made beside it (no lock file,
    no renamed copy)."""
    assert path.read_bytes() == BAD[kind]
    assert sorted(p.name for p in path.parent.glob(f"{path.name}*")) == [path.name]


def assert_left_in_place(path: Path) -> None:
    assert (path / "inside.txt").read_text() == "kept"
    assert not list(path.parent.glob(f"{path.name}.corrupt-*"))


def only_warning(record: list[warnings.WarningMessage], path: Path) -> ConfigCacheWarning:
    mine = [w.message for w in record if issubclass(w.category, ConfigCacheWarning)]
    assert len(mine) == 1, [str(m) for m in mine]
    warning = mine[0]
    assert isinstance(warning, ConfigCacheWarning)
    assert str(path) in str(warning) and warning.path == path
    return warning


READERS: dict[str, Callable[[ConfigCache, Path], object]] = {
    "get": lambda cache, tmp: cache.get(make_key()),
    "entries": lambda cache, tmp: cache.entries(),
    "put": lambda cache, tmp: cache.put(make_key(), CONFIG, ms=1.0, default_ms=2.0),
    "clear": lambda cache, tmp: cache.clear(),
    "export": lambda cache, tmp: cache.export(tmp / "exported.json"),
    "import-into": lambda cache, tmp: cache.import_(tmp / "good.json"),
    "check_writable": lambda cache, tmp: cache.check_writable(),
}


# Lookups read a bad file as an empty cache, with a warning; writes refuse it.
LOOKUPS = ("get", "entries", "export")


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", BAD)
def test_every_reader_reports_every_bad_file_and_leaves_it(tmp_path: Path, kind: str,
                                                           reader: str) -> None:
    path = tmp_path / "configs.json"
    make_bad(path, kind)
    (tmp_path / "good.json").write_text(good_text())
    cache = ConfigCache(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if reader in LOOKUPS:
            READERS[reader](cache, tmp_path)
            warning = only_warning(record, path)
            assert "it is left as it is" in str(warning)
        else:
            with pytest.raises(CacheFormatError) as refused:
                READERS[reader](cache, tmp_path)
            message = str(refused.value)
            assert message.startswith(f"{path}: not a usable config cache (")
            assert message.endswith("so it is not written; it is left as it is: fix it, remove "
                                    f"it, or name another cache (--cache, ${ENV_VAR})")
            assert not [w for w in record if issubclass(w.category, ConfigCacheWarning)]
    assert_untouched(path, kind)
    # Once it is removed, the cache is an ordinary one: no warnings, and it can be written.
    path.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put(make_key(head_dim=64), CONFIG, ms=1.0, default_ms=2.0)
        assert make_key(head_dim=64).as_str() in ConfigCache(path).entries()


# A directory in the cache's place: lookups read it as an empty cache, with a warning; writes
# refuse it, as they refuse a bad file.
@pytest.mark.parametrize("reader", READERS)
def test_a_directory_in_the_caches_place_is_never_moved(tmp_path: Path, reader: str) -> None:
    """It may be someone's home: never read, never renamed, whatever touches it."""
    path = tmp_path / "configs.json"
    make_directory(path)
    (tmp_path / "good.json").write_text(good_text())
    cache = ConfigCache(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if reader in LOOKUPS:
            READERS[reader](cache, tmp_path)
            warning = only_warning(record, path)
            assert "is a directory, not a cache file; name a file" in str(warning)
        else:
            with pytest.raises(IsADirectoryError, match=re.escape(f"{path} is a directory")):
                READERS[reader](cache, tmp_path)
    assert_left_in_place(path)


@pytest.mark.parametrize("kind", ["random-bytes", "utf-16", "directory"])
def test_import_of_an_unreadable_source_names_it_and_leaves_it(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "incoming.json"
    make_directory(src) if kind == "directory" else make_bad(src, kind)
    cache = ConfigCache(tmp_path / "configs.json")
    error = IsADirectoryError if kind == "directory" else ValueError
    with pytest.raises(error, match=re.escape(str(src))):
        cache.import_(src)
    assert src.exists() and not list(tmp_path.glob("incoming.json.corrupt-*"))


def test_a_byte_order_mark_is_not_corruption(tmp_path: Path) -> None:
    path = tmp_path / "configs.json"
    path.write_bytes(good_text().encode("utf-8-sig"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ConfigCache(path).get(make_key()) == CONFIG


# -- the lookup at launch, and `run` ---------------------------------------------------------------


@pytest.fixture
def env_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache the kernels' lookup reads ($DKBENCH_CACHE), and no shipped configs but ours."""
    path = tmp_path / "user" / "configs.json"
    path.parent.mkdir()
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setenv(ENV_VAR, str(path))
    monkeypatch.setattr(select, "SHIPPED_DIR", shipped)
    select.clear_memo()
    select._shipped.cache_clear()
    yield path
    select.clear_memo()
    select._shipped.cache_clear()


def probe_lookup() -> tuple[torch.Tensor, BlockLayout, CacheKey]:
    layout = local_stride_layout(1, 128, 32, local_blocks=2, vert_stride=2)
    probe = torch.empty(1, 1, 1, 32)
    key = select.cache_key("fwd", CPU, probe.dtype, 32, 32, 128,
                           select.block_density(layout, 128))
    return probe, layout, key


def ship(env_cache: Path, key: CacheKey, config: dict) -> None:
    ConfigCache(select.SHIPPED_DIR / "cpu.json").put(key, config, ms=1.0, default_ms=2.0)
    select._shipped.cache_clear()


@pytest.mark.parametrize("kind", ["random-bytes", "truncated", "entries-a-list", "directory"])
@pytest.mark.parametrize("shipped", [True, False], ids=["then-shipped", "then-default"])
def test_lookup_skips_a_bad_user_cache(env_cache: Path, kind: str, shipped: bool) -> None:
    probe, layout, key = probe_lookup()
    small = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    if shipped:
        ship(env_cache, key, small)
    make_directory(env_cache) if kind == "directory" else make_bad(env_cache, kind)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        config, source = select.resolve_config("fwd", probe, layout, 128)
        select.clear_memo()
        assert select.resolve_config("fwd", probe, layout, 128) == (config, source)
    only_warning(record, env_cache)
    assert_left_in_place(env_cache) if kind == "directory" else assert_untouched(env_cache, kind)
    if shipped:
        assert (config.as_dict(), source) == ({**small, "impl": "triton"}, "shipped")
    else:
        assert source == "default"


def test_lookup_skips_a_cached_config_the_block_cannot_use(env_cache: Path) -> None:
    # A hand-edited entry with a tile wider than the sparse block: the shipped config answers.
    probe, layout, key = probe_lookup()
    small = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    ship(env_cache, key, small)
    ConfigCache(env_cache).put(key, {**small, "block_n": 128}, ms=1.0, default_ms=2.0)
    config, source = select.resolve_config("fwd", probe, layout, 128)
    assert (config.block_n, source) == (16, "shipped")


@specs.needs_interpreter
def test_run_of_the_bundled_kernel_is_ok_with_a_random_bytes_cache(tmp_path: Path,
                                                                  env_cache: Path) -> None:
    make_bad(env_cache, "random-bytes")
    path = specs.write_spec(tmp_path, providers=["dkbench"], mode=["fwd", "bwd"])
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rows = runner.execute(sweep, path.read_text(), plan, CPU)
    assert [(r.status, r.config_source) for r in rows] == [("ok", "default")] * 2, rows
    only_warning(record, env_cache)
    assert_untouched(env_cache, "random-bytes")


# -- the cache commands ----------------------------------------------------------------------------


@pytest.fixture
def cache_cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(cache_app, name="cache")
    return app


def invoke_cache(app: typer.Typer, *args: str, env: dict[str, str | None] | None = None,
                 input: str | None = None) -> Result:
    env = {"COLUMNS": "80", ENV_VAR: None, **(env or {})}
    return CliRunner().invoke(app, ["cache", *args], env=env, input=input)


def assert_warned_once(result: Result, path: Path) -> None:
    lines = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and "it is left as it is" in lines[0], result.stderr
    assert "Traceback" not in result.output and "ConfigCacheWarning" not in result.stderr


COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "show": lambda tmp: ["show"],
    "clear": lambda tmp: ["clear", "--yes"],
    "export": lambda tmp: ["export", str(tmp / "out.json")],
    "import": lambda tmp: ["import", str(tmp / "good.json")],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["random-bytes", "utf-16", "truncated", "format-true"])
def test_cache_commands_name_a_bad_cache_and_leave_it(cache_cli: typer.Typer, tmp_path: Path,
                                                      command: str, kind: str) -> None:
    """The reading commands warn and go on without it (exit 0); the writing ones refuse it
    (exit 2); none moves it or writes beside it."""
    path = tmp_path / "configs.json"
    make_bad(path, kind)
    (tmp_path / "good.json").write_text(good_text())
    # Through the environment variable: --cache refuses a directory before the command runs.
    r = invoke_cache(cache_cli, *COMMANDS[command](tmp_path), env={ENV_VAR: str(path)})
    if command in ("show", "export"):
        assert r.exit_code == 0, r.output
        assert_warned_once(r, path)
    else:
        assert r.exit_code == 2, r.output
        message = " ".join(r.stderr.split())
        assert f"{path}: not a usable config cache (" in message, r.stderr
        assert "it is left as it is: fix it, remove it, or name another cache" in message
        assert "Traceback" not in r.output and "warning" not in r.stderr
    assert_untouched(path, kind)
    if command == "export":
        assert json.loads((tmp_path / "out.json").read_text())["entries"] == {}


@pytest.mark.parametrize("command", COMMANDS)
def test_cache_commands_leave_a_directory_named_as_the_cache_alone(
        cache_cli: typer.Typer, tmp_path: Path, command: str) -> None:
    """Through the environment variable (--cache refuses a directory before the command runs):
    every command refuses it (the reading ones were: a warning, no entries, exit 0); nothing
    moves."""
    path = tmp_path / "configs.json"
    make_directory(path)
    (tmp_path / "good.json").write_text(good_text())
    r = invoke_cache(cache_cli, *COMMANDS[command](tmp_path), env={ENV_VAR: str(path)})
    assert "Traceback" not in r.output
    message = f"{path} is a directory, not a cache file; name a file"
    assert r.exit_code == 2 and message in " ".join(r.stderr.split()), r.output
    assert "warning" not in r.stderr
    assert_left_in_place(path)


def test_cache_import_of_a_random_bytes_file_names_it(cache_cli: typer.Typer,
                                                      tmp_path: Path) -> None:
    src = tmp_path / "incoming.json"
    make_bad(src, "random-bytes")
    r = invoke_cache(cache_cli, "import", str(src), "--cache", str(tmp_path / "configs.json"))
    assert r.exit_code == 2, r.output
    assert "error" in r.stderr and str(src) in r.stderr and "UTF-8" in r.stderr, r.stderr


# -- tune: a bad cache is refused before timing; unwritable places fail before it --------------


@pytest.fixture
def tune_cli() -> typer.Typer:
    return tune_app()


def invoke_tune(app: typer.Typer, *args: str) -> Result:
    return CliRunner().invoke(app, ["tune", *args], env={"COLUMNS": "80"})


def deny_writes(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``folder`` reads as unwritable, as chmod cannot make it for root (CI runs as root)."""
    real = os.access

    def access(path, mode, *args, **kwargs):  # noqa: ANN001, ANN202
        if Path(path) == folder and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


@specs.needs_interpreter
def test_tune_refuses_a_bad_cache_before_timing_and_leaves_it(
        tune_cli: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        fake_kernel) -> None:  # noqa: F811
    cache = tmp_path / "configs.json"
    make_bad(cache, "random-bytes")
    seen = []
    monkeypatch.setattr(runner, "measure_interleaved", lambda *a, **k: seen.append(1))
    r = invoke_tune(tune_cli, str(write_spec(tmp_path)), "--device", "cpu", "--block-m", "16,32",
                    "--block-n", "32", "--cache", str(cache), "--out", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert seen == []  # refused before anything was timed
    message = " ".join(r.stderr.split())
    assert f"{cache}: not a usable config cache (not UTF-8 text" in message, r.stderr
    assert "fix it, remove it, or name another cache" in message
    assert "Traceback" not in r.output
    assert_untouched(cache, "random-bytes")


@specs.needs_interpreter
@pytest.mark.parametrize("where", ["out-is-a-file", "out-parent-is-a-file", "out-unwritable",
                                   "cache-parent-is-a-file", "cache-unwritable"])
def test_tune_checks_out_and_cache_before_timing(tune_cli: typer.Typer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 nothing_timed, where: str) -> None:
    out, cache = tmp_path / "out", tmp_path / "cachedir" / "configs.json"
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    named = {"out-is-a-file": blocker, "out-parent-is-a-file": blocker / "results",
             "out-unwritable": locked / "results", "cache-parent-is-a-file": blocker / "c.json",
             "cache-unwritable": locked / "configs.json"}[where]
    if where.startswith("out"):
        out = named
    else:
        cache = named
    if where.endswith("unwritable"):
        deny_writes(monkeypatch, locked)
    r = invoke_tune(tune_cli, str(write_spec(tmp_path)), "--device", "cpu", "--block-m", "16,32",
                    "--block-n", "32", "--cache", str(cache), "--out", str(out))
    assert r.exit_code == 2, r.output
    assert "error" in r.stderr and str(named) in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and not cache.exists()


# -- tune --help at 80 columns ---------------------------------------------------------------------


def help_at_80(app: typer.Typer) -> list[str]:
    r = CliRunner().invoke(app, ["tune", "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": None})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, r.stdout
    return lines


def option_cells(lines: list[str], name: str, help_text: str) -> tuple[list[str], int]:
    """The lines of the help column of one row of an options table, and that column's width."""
    words = " ".join(help_text.split()[:2])
    (start,) = [i for i, line in enumerate(lines)
                if line.startswith("│") and f" {name} " in line and words in line]
    offset = lines[start].index(words)
    width = len(lines[start].rstrip()) - 2 - offset  # " │" closes every row
    cells = [lines[start][offset:-1].rstrip()]
    for line in lines[start + 1:]:
        if not line.startswith("│") or line[1:offset].strip():
            break  # the panel or the row ended
        cells.append(line[offset:-1].rstrip())
    return [c for c in cells if c], width


def test_tune_help_options_fit_80_columns_without_dangling_words(tune_cli: typer.Typer) -> None:
    lines = help_at_80(tune_cli)
    command = typer.main.get_command(tune_cli).commands["tune"]
    for param in command.params:
        if not param.help or param.name == "help":
            continue
        name = param.opts[0] if param.opts[0].startswith("-") else param.name
        cells, width = option_cells(lines, name, param.help)
        text = [c for c in cells if not c.startswith("[default:")]
        # Nothing lost, no word folded in two, at most two lines, and no word left alone on one.
        assert " ".join(text) == " ".join(param.help.split()), (name, cells)
        assert len(text) <= 2, f"{name}: help takes {len(text)} lines at 80 columns: {cells}"
        assert len(text) == 1 or len(text[-1].split()) > 1, f"{name}: dangling {text[-1]!r}"
        for line, after in zip(text, text[1:]):
            assert len(line) + 1 + len(after.split()[0]) > width, f"{name}: broke early {cells}"


def test_tune_help_prose_wraps_at_the_width_not_at_source_line_breaks(
        tune_cli: typer.Typer) -> None:
    lines = help_at_80(tune_cli)
    usable = 78  # one column of padding each side
    top = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
    prose = [line.strip() for line in lines[top:next(i for i, line in enumerate(lines)
                                                     if line.startswith("╭"))]]
    assert sum(map(len, prose)) > 500, "the explanations belong in the command's paragraphs"
    for line, after in zip(prose, prose[1:]):
        if not line or not after or after.startswith("- "):
            continue  # a paragraph or a list item ends here
        assert len(line) + 1 + len(after.split()[0]) > usable, \
            f"line broken before the width: {line!r} / {after!r}"


def test_prose_help_joins_paragraph_lines_and_keeps_items() -> None:
    doc = """First line
    goes on.

    Para two
    continues:
    - item one
      wraps
    - item two
    """
    assert prose_help(doc) == ("First line goes on.\n\nPara two continues:\n- item one wraps\n"
                               "- item two")
