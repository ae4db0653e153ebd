"""`dkbench cache ...` through Typer's CliRunner, on a small app built here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from dkbench.commands.cache import cache_app
from dkbench.tune.cache import cache_rows, format_config
from kernels.config_cache import ENV_VAR, ConfigCache
from tests.cache_keys import CONFIG, make_key


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(cache_app, name="cache")
    return app


@pytest.fixture
def cache(tmp_path: Path) -> ConfigCache:
    cache = ConfigCache(tmp_path / "configs.json")
    cache.put(make_key(), CONFIG, ms=0.4, default_ms=0.5)
    cache.put(make_key(head_dim=64), {**CONFIG, "num_warps": 8}, ms=1.0, default_ms=3.0)
    return cache


def invoke(app: typer.Typer, *args: str, input: str | None = None,
           env: dict[str, str | None] | None = None) -> Result:
    # Wide enough that rich never folds a table cell the assertions look for.
    env = {"COLUMNS": "250", ENV_VAR: None, **(env or {})}
    return CliRunner().invoke(app, ["cache", *args], input=input, env=env)


def test_path_prefers_flag_over_env(app: typer.Typer, tmp_path: Path) -> None:
    env = {ENV_VAR: str(tmp_path / "env.json")}
    r = invoke(app, "path", env=env)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path / "env.json")
    r = invoke(app, "path", "--cache", str(tmp_path / "flag.json"), env=env)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path / "flag.json")


def test_show_lists_entries(app: typer.Typer, cache: ConfigCache) -> None:
    r = invoke(app, "show", "--cache", str(cache.path))
    assert r.exit_code == 0, r.output
    for text in ("NVIDIA H100 80GB HBM3", "64x32 w4 s3", "64x32 w8 s3", "1.25x", "3.00x",
                 "ab12cd34", "bfloat16"):
        assert text in r.stdout, f"{text!r} missing from:\n{r.output}"


def test_show_empty(app: typer.Typer, tmp_path: Path) -> None:
    r = invoke(app, "show", "--cache", str(tmp_path / "none.json"))
    assert r.exit_code == 0, r.output
    assert "no entries" in r.stdout


def test_clear_with_yes(app: typer.Typer, cache: ConfigCache) -> None:
    r = invoke(app, "clear", "--yes", "--cache", str(cache.path))
    assert r.exit_code == 0, r.output
    assert "removed 2" in r.stdout
    assert ConfigCache(cache.path).entries() == {}


def test_clear_asks_first(app: typer.Typer, cache: ConfigCache) -> None:
    r = invoke(app, "clear", "--cache", str(cache.path), input="n\n")
    assert r.exit_code == 1, r.output
    assert len(ConfigCache(cache.path).entries()) == 2
    r = invoke(app, "clear", "--cache", str(cache.path), input="y\n")
    assert r.exit_code == 0, r.output
    assert ConfigCache(cache.path).entries() == {}


def test_export_import_round_trip(app: typer.Typer, cache: ConfigCache, tmp_path: Path) -> None:
    out = tmp_path / "export.json"
    r = invoke(app, "export", str(out), "--cache", str(cache.path))
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["format"] == 1

    other = tmp_path / "other.json"
    r = invoke(app, "import", str(out), "--cache", str(other))
    assert r.exit_code == 0, r.output
    assert "imported 2" in r.stdout
    assert ConfigCache(other).entries() == cache.entries()


def test_import_keep_existing(app: typer.Typer, cache: ConfigCache, tmp_path: Path) -> None:
    out = tmp_path / "export.json"
    cache.export(out)
    other = ConfigCache(tmp_path / "other.json")
    mine = {**CONFIG, "num_stages": 1}
    other.put(make_key(), mine, ms=0.1, default_ms=0.5)
    r = invoke(app, "import", str(out), "--keep-existing", "--cache", str(other.path))
    assert r.exit_code == 0, r.output
    assert "imported 1" in r.stdout
    assert other.get(make_key()) == mine


@pytest.mark.parametrize("content", [None, "{nope", json.dumps({"format": 7, "entries": {}})],
                         ids=["missing", "corrupt", "foreign-format"])
def test_import_bad_file_exits_2(app: typer.Typer, cache: ConfigCache, tmp_path: Path,
                                 content: str | None) -> None:
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    r = invoke(app, "import", str(bad), "--cache", str(cache.path))
    assert r.exit_code == 2, r.output
    assert "error" in r.stderr and "bad.json" in r.stderr, r.output
    assert len(ConfigCache(cache.path).entries()) == 2


def test_export_to_unwritable_place_exits_2(app: typer.Typer, cache: ConfigCache,
                                           tmp_path: Path) -> None:
    # A regular file where the destination's directory should be: an OSError, reported not raised.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    r = invoke(app, "export", str(blocker / "out.json"), "--cache", str(cache.path))
    assert r.exit_code == 2, r.output
    assert "error" in r.stderr, r.output


def test_rows_and_config_format(cache: ConfigCache) -> None:
    rows = cache_rows(cache.entries())
    assert [r.key.head_dim for r in rows] == [64, 128]
    assert rows[1].speedup == pytest.approx(1.25)
    assert format_config({**CONFIG, "waves": 2}) == "64x32 w4 s3 waves=2"
    broken = {"k": {**cache.entry(make_key()), "ms": 0.0}}  # type: ignore[dict-item]
    assert math.isnan(cache_rows(broken)[0].speedup)


def test_show_fits_80_columns_with_every_key_field(app: typer.Typer, cache: ConfigCache) -> None:
    gluon = {"block_m": 128, "block_n": 128, "num_warps": 4, "num_stages": 3, "impl": "gluon"}
    cache.put(make_key(kernel="dq", seqlen_bucket=131072, density_bucket=0.05, steps="owned"),
              gluon, ms=12.5, default_ms=13.75)
    cache.put(make_key(gpu="cpu (triton interpreter)", capability="", kernel="bwd",
                       dtype="float32", head_dim=32, block_size=32, seqlen_bucket=256,
                       density_bucket=1.0), CONFIG, ms=0.2, default_ms=0.3)
    r = invoke(app, "show", "--cache", str(cache.path), env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    # The first line names the cache file, whole (a path is not folded): the tables must fit.
    too_long = [line for line in r.stdout.splitlines()[1:] if len(line) > 80]
    assert not too_long, "\n".join(too_long)
    words = r.stdout.split()
    for field in ("NVIDIA H100 80GB HBM3, cc 9.0, triton 3.6.0",
                  "cpu (triton interpreter), triton 3.6.0", "64x32 w4 s3", "0.4000", "0.5000",
                  "1.25x", "12.5000", "13.7500", "1.10x", "1.50x"):
        assert field in r.stdout, f"{field!r} missing from:\n{r.stdout}"
    for word in ("fwd", "bwd", "dq", "ab12cd34", "bfloat16", "float32", "d128", "d64", "d32",
                 "bs64", "bs32", "s8192", "s131072", "s256", "p0.35", "p0.05", "p1.00", "owned",
                 "gluon", "128x128"):
        assert word in words, f"{word!r} missing (or folded) in:\n{r.stdout}"


def test_a_winner_whose_default_failed_is_written_as_strict_json(app: typer.Typer,
                                                                 tmp_path: Path) -> None:
    """The default's time is NaN when the default config failed: the file says null (NaN is no
    JSON, and jq refuses it), reads back, and `show` says the default failed."""
    cache = ConfigCache(tmp_path / "configs.json")
    cache.put(make_key(), CONFIG, ms=0.4, default_ms=math.nan)

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in the cache file")

    on_disk = json.loads(cache.path.read_text(), parse_constant=no_constants)
    assert on_disk["entries"][make_key().as_str()]["default_ms"] is None
    assert ConfigCache(cache.path).get(make_key()) == CONFIG
    r = invoke(app, "show", "--cache", str(cache.path))
    assert r.exit_code == 0, r.output
    row = next(line for line in r.stdout.splitlines() if "0.4000" in line)
    assert "failed" in row and "nan" not in row.lower()
