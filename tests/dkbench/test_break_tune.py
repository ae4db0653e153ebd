"""Trying to break `dkbench tune` and the best-config cache: search-space values no kernel can
take, flags that would do nothing, a tune that dies part-way, cache paths that are symlinks,
devices or fifos, and write errors; each refused in one line naming the flag or file (exit 2), or
handled without losing what was found."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner, Result

from dkbench.commands.cache import cache_app
from dkbench.errors import ResultsWriteError
from dkbench.spec.load import load_spec
from dkbench.tune import tuner as tuning
from dkbench.tune.plan import plan_tune
from dkbench.tune.rows import append_tune_rows
from kernels.config_cache import ConfigCache, read_entries
from tests.cache_keys import CONFIG, make_key
from tests.dkbench.cli_helpers import flat
from tests.dkbench.specs import needs_interpreter
from tests.dkbench.test_tune import (  # noqa: F401 - fake_kernel: fixture
    fake_kernel,
    read_rows,
    tune_app,
    write_spec,
)

CPU = torch.device("cpu")


def invoke_tune(*args: object) -> Result:
    return CliRunner().invoke(tune_app(), ["tune", *map(str, args)], env={"COLUMNS": "400"})


def invoke_cache(*args: object) -> Result:
    app = typer.Typer()
    app.add_typer(cache_app, name="cache")
    app.command("noop")(lambda: None)
    return CliRunner().invoke(app, ["cache", *map(str, args)], env={"COLUMNS": "400"})


def refused(result: Result, *words: str) -> str:
    text = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in text and result.exception is None or \
        isinstance(result.exception, SystemExit), result.output
    for word in words:
        assert word in text, text
    return text


# -- search-space flags ------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("flag, value, allowed", [
    ("--block-m", "3", "powers of two from 16"),
    ("--block-m", "16,8", "powers of two from 16"),
    ("--block-n", "48", "powers of two from 16"),
    ("--num-warps", "3", "1, 2, 4, 8, 16"),
    ("--num-warps", "4,32", "1, 2, 4, 8, 16"),
    ("--num-stages", "1000", "integers 1 to 8"),  # was accepted and searched
    ("--num-stages", "4,9", "integers 1 to 8"),
])
def test_a_value_no_kernel_can_take_is_refused(flag: str, value: str, allowed: str) -> None:
    # Before: each such config was "pruned" and the tune timed the default against itself.
    bad = [v for v in value.split(",") if v not in ("16", "4")][0]
    refused(invoke_tune("--device", "cpu", "--dry-run", flag, value),
            f"{flag} '{value}': {bad} cannot be a", f"allowed: {allowed}")


@needs_interpreter
def test_a_shape_past_the_layouts_int32_block_count_is_refused() -> None:
    # Was planned, then the layout's build failed with torch's allocation error.
    refused(invoke_tune("--device", "cpu", "--dry-run", "--seqlen", "800000", "--block-size",
                        "16", "--heads", "1", "--kv-heads", "1"),
            "shape flags: patterns: local_stride(bs16,", "at seqlen=800000 is 50000 blocks a side",
            "allowed: at most 46340")


@needs_interpreter
@pytest.mark.parametrize("flags, why", [
    (["--block-n", "64"], "each is pruned (block_n=64 must not exceed the sparse block size 32)"),
    (["--impl", "gluon"], "each is pruned (block_m=16 must be 128 for impl='gluon'"),
    (["--block-m", "32", "--block-n", "32"], "they give only the default config"),
])
def test_space_flags_that_leave_only_the_default_are_refused_before_timing(
        tmp_path: Path, nothing_timed, flags: list[str], why: str) -> None:
    out, cache = tmp_path / "out", tmp_path / "c.json"
    given = ", ".join(f"{f} {v}" for f, v in zip(flags[::2], flags[1::2]))
    refused(invoke_tune("--device", "cpu", *flags, "--out", out, "--cache", cache),
            f"error: {given}: no config to compare with the default in any case: {why}",
            "--dry-run lists every config with why")
    assert not out.exists() and not cache.exists()
    # The dry run still lists them, and says that the tune would be refused.
    dry = invoke_tune("--device", "cpu", *flags, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "note: without --dry-run this tune is refused" in flat(dry.output)


@needs_interpreter
@pytest.mark.parametrize("extra, spec_overrides, words", [
    (["--no-screen"], {}, "--finalists 3 does nothing with --no-screen"),
    ([], {"timing": {"warmup_ms": 1, "rep_ms": 1, "interleave": False}},
     "--finalists 3 does nothing: {spec}: timing.interleave is false, and the screen runs only "
     "timed interleaved"),
])
def test_finalists_that_do_nothing_are_named(tmp_path: Path, extra: list[str],
                                             spec_overrides: dict, words: str) -> None:
    spec = write_spec(tmp_path, **spec_overrides)
    result = invoke_tune(spec, "--device", "cpu", "--dry-run", "--finalists", "3", *extra)
    assert result.exit_code == 0, result.output
    assert f"warning: {words.format(spec=spec)}" in flat(result.output)
    assert "warning" not in flat(invoke_tune(spec, "--device", "cpu", "--dry-run").output)


# -- other flags -------------------------------------------------------------------------------


@needs_interpreter
def test_a_bad_mode_names_the_flag_with_shape_flags_too() -> None:
    # Before: "shape flags: mode: Value error, 'nope' is not a mode; ...".
    text = refused(invoke_tune("--device", "cpu", "--dry-run", "--mode", "nope"),
                   "--mode 'nope': allowed values are fwd, bwd, fwd_bwd")
    assert "Value error" not in text


@needs_interpreter
@pytest.mark.parametrize("flags, words", [
    (["--local-blocks", "0"], "error: --local-blocks 0: Input should be greater than or equal"),
    (["--vert-stride", "0"], "error: --vert-stride 0: Input should be greater than or equal"),
    (["--seqlen", "0"], "error: --seqlen 0: must be a positive integer"),
    (["--heads", "3", "--kv-heads", "2"], "error: --kv-heads 2: heads=3 is not divisible"),
    (["--block-size", "7"], "error: --block-size 7: must be a power of two >= 16"),
    (["--dtype", "nope"], "error: --dtype nope: unknown dtype 'nope'; allowed: bf16"),
])
def test_a_bad_shape_flag_is_named_as_the_flag(flags: list[str], words: str) -> None:
    # Before: "shape flags: patterns.0.local_stride.local_blocks: ...", a key the user never wrote.
    refused(invoke_tune("--device", "cpu", "--dry-run", *flags), words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_spec_for_cuda_on_a_cpu_machine_names_the_spec_key(tmp_path: Path) -> None:
    # Before: "--device cuda: no CUDA GPU is visible", a flag the user did not give.
    spec = write_spec(tmp_path, device="cuda")
    text = refused(invoke_tune(spec, "--dry-run"), f"{spec}: device: cuda, but no CUDA GPU",
                   "allowed here: auto, cpu")
    assert "--device cuda:" not in text


# -- a tune that dies part-way keeps its winners ---------------------------------------------


def _two_case_jobs(tmp_path: Path):
    path = write_spec(tmp_path, seqlen=[128, 256])  # two seqlen buckets: two cache keys
    sweep = load_spec(path)
    overrides = {"block_m": (16, 32), "block_n": (32,), "num_warps": (4,), "num_stages": (1,)}
    return sweep, path.read_text(), plan_tune(sweep, ("fwd",), CPU, overrides)


@pytest.mark.parametrize("death", [RuntimeError("lost the machine"), KeyboardInterrupt()])
def test_a_tune_that_dies_part_way_keeps_the_winners_it_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_kernel,  # noqa: F811
        death: BaseException) -> None:
    sweep, text, jobs = _two_case_jobs(tmp_path)
    assert len(jobs) == 2
    real = tuning.tune_kernel

    def tune_kernel(job, *args, **kwargs):
        if job is jobs[1]:
            raise death
        return real(job, *args, **kwargs)

    monkeypatch.setattr(tuning, "tune_kernel", tune_kernel)
    cache = tmp_path / "cache.json"
    with pytest.raises(type(death)):
        tuning.execute_tune(sweep, text, jobs, CPU, tmp_path / "out", cache)
    # Before: the cache was written only after the last case, so it stayed empty.
    (entry,) = ConfigCache(cache).entries().values()
    assert entry["key"]["seqlen_bucket"] == 128
    assert entry["config"]["block_m"] == 16  # FAKE_MS favours it
    (run_dir,) = (tmp_path / "out").iterdir()
    assert {r["seqlen"] for r in read_rows(run_dir)} == {"128"}


def test_a_tune_to_the_end_writes_each_winner_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   fake_kernel) -> None:  # noqa: F811
    sweep, text, jobs = _two_case_jobs(tmp_path)
    writes = []
    real = ConfigCache.put_many

    def put_many(self, batch, **kwargs):
        writes.append([key.seqlen_bucket for key, *_ in batch])
        return real(self, batch, **kwargs)

    monkeypatch.setattr(ConfigCache, "put_many", put_many)
    outcome = tuning.execute_tune(sweep, text, jobs, CPU, tmp_path / "out", tmp_path / "c.json")
    assert writes == [[128], [256]]  # as each case finished, and nothing again at the end
    assert sorted(w.key.seqlen_bucket for w in outcome.writes) == [128, 256]
    assert len(ConfigCache(tmp_path / "c.json").entries()) == 2


@needs_interpreter
def test_interrupted_tune_says_the_winners_so_far_are_cached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning, "execute_tune", interrupted)
    result = invoke_tune(write_spec(tmp_path), "--device", "cpu", "--out", tmp_path / "out",
                         "--cache", tmp_path / "c.json")
    assert result.exit_code == 130, result.output
    text = flat(result.output)
    assert "their winners in the cache" in text and "not written" not in text


def test_a_tune_interrupted_while_planning_says_nothing_was_tuned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dkbench.tune.plan.plan_tune", interrupted)
    result = invoke_tune(write_spec(tmp_path), "--device", "cpu", "--out", tmp_path / "out",
                         "--cache", tmp_path / "c.json")
    assert result.exit_code == 130, result.output
    # was: exit 130 and not a word
    assert "Interrupted while planning the tune; nothing was tuned." in flat(result.output)
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.json").exists()


def test_tune_csv_that_cannot_be_written_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    # Before: a bare OSError, a traceback from the CLI.
    with pytest.raises(ResultsWriteError, match=f"cannot write {blocker / 'tune.csv'}"):
        append_tune_rows(blocker / "tune.csv", [])


# -- cache files that are not plain files ----------------------------------------------------


def good_cache(path: Path) -> None:
    ConfigCache(path).put(make_key(), CONFIG, ms=1.0, default_ms=2.0)


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_writes_through_a_symlinked_cache_update_the_file_it_names(tmp_path: Path) -> None:
    real = tmp_path / "synced" / "configs.json"
    real.parent.mkdir()
    good_cache(real)
    link = tmp_path / "configs.json"
    link.symlink_to(real)
    ConfigCache(link).put(make_key(head_dim=64), CONFIG, ms=1.0, default_ms=2.0)
    # Before: the link itself was replaced by a new file, and the synced one never changed.
    assert link.is_symlink()
    assert len(read_entries(real)[1]) == 2
    r = invoke_cache("clear", "--yes", "--cache", link)
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and read_entries(real)[1] == {}


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_a_bad_file_behind_a_symlink_is_left_as_it_is_and_so_is_the_link(tmp_path: Path) -> None:
    real = tmp_path / "synced" / "configs.json"
    real.parent.mkdir()
    real.write_text("{truncated")
    link = tmp_path / "configs.json"
    link.symlink_to(real)
    r = invoke_cache("show", "--cache", link)
    assert r.exit_code == 0, r.output
    assert "not valid JSON" in flat(r.output)
    r = invoke_cache("clear", "--yes", "--cache", link)
    assert r.exit_code == 2 and "not a usable config cache" in flat(r.output), r.output
    assert link.is_symlink() and real.read_text() == "{truncated"
    assert [p.name for p in real.parent.iterdir()] == ["configs.json"]


@pytest.fixture
def fifo(tmp_path: Path):
    """A fifo at ``configs.json``, fed ``junk`` whenever something opens it to read: without the
    special-file check a reader would block on it forever; with this it reads junk instead."""
    path = tmp_path / "configs.json"
    os.mkfifo(path)
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no one reads
            except OSError:
                time.sleep(0.01)
                continue
            os.write(fd, b"junk")
            os.close(fd)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    yield path
    stop.set()
    feeder.join()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="fifos")
def test_a_fifo_as_the_cache_is_never_read_moved_or_replaced(tmp_path: Path, fifo: Path) -> None:
    # Stands for any special file (/dev/null as root): before, reading a fifo hung, and a device
    # that read as empty was renamed to <name>.corrupt-* (as root, /dev/null itself) or, as an
    # export destination, replaced by a regular file.
    good = tmp_path / "good.json"
    good_cache(good)
    # Was: shown as a warning and "no entries", exit 0.
    refused(invoke_cache("show", "--cache", fifo), f"{fifo} is not a regular file")
    refused(invoke_cache("import", good, "--cache", fifo), f"{fifo} is not a regular file")
    refused(invoke_cache("import", fifo, "--cache", good), f"{fifo} is not a regular file")
    refused(invoke_cache("export", fifo, "--cache", good),
            f"cannot write the export file {fifo}: it is not a regular file")
    assert fifo.exists() and not fifo.is_file()
    assert list(tmp_path.glob("*.corrupt-*")) == []
    assert len(read_entries(good)[1]) == 1


@needs_interpreter
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="fifos")
def test_tune_refuses_a_fifo_cache_before_timing(tmp_path: Path, nothing_timed,
                                                 fifo: Path) -> None:
    refused(invoke_tune(write_spec(tmp_path), "--device", "cpu", "--block-m", "16,32",
                        "--cache", fifo, "--out", tmp_path / "out"),
            f"{fifo} is not a regular file")


def test_tune_refuses_a_cache_path_of_a_user_that_does_not_exist(tmp_path: Path,
                                                                  nothing_timed) -> None:
    # Was: a RuntimeError traceback from expanduser ("Could not determine home directory").
    given = "~no-such-user-dkbench/configs.json"
    refused(invoke_tune(write_spec(tmp_path), "--device", "cpu", "--block-m", "16,32",
                        "--cache", given, "--out", tmp_path / "out"),
            f"cannot use the config cache {given}: its ~ names no user here")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["export", "import"])
def test_write_errors_name_the_file_and_the_reason(tmp_path: Path, command: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    good = tmp_path / "good.json"
    good_cache(good)
    if command == "export":
        # Before: "error: [Errno 17] File exists: 'blocker'", naming neither the export nor why.
        refused(invoke_cache("export", blocker / "out.json", "--cache", good),
                f"error: cannot write the export file {blocker / 'out.json'}: {blocker} is not "
                "a directory")
    else:
        refused(invoke_cache("import", good, "--cache", blocker / "c.json"),
                f"error: cannot use the config cache {blocker / 'c.json'}: {blocker} is not "
                "a directory")


def test_a_long_cache_name_that_just_fits_can_be_written(tmp_path: Path) -> None:
    # Before: the temporary file's name (".<name>.<pid>.<hex>.tmp") passed the 255-byte limit
    # that the cache file's own name kept to, so export failed with "File name too long".
    good = tmp_path / "good.json"
    good_cache(good)
    dest = tmp_path / ("e" * 250 + ".json")
    r = invoke_cache("export", dest, "--cache", good)
    assert r.exit_code == 0, r.output
    assert json.loads(dest.read_text())["format"] == 1


def test_a_cache_where_no_lock_file_can_be_made_fails_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """filelock would retry a lock file it cannot create for its whole timeout, as if another
    process held it; the write fails at once, naming the lock file."""
    from kernels import config_cache

    monkeypatch.setattr(config_cache, "_LOCK_TIMEOUT_S", 30.0)
    real_open = os.open

    def no_lock_files(path, flags, *args):
        if str(path).endswith(".lock"):
            raise FileNotFoundError(2, "No such file or directory")
        return real_open(path, flags, *args)

    monkeypatch.setattr(config_cache.os, "open", no_lock_files)
    cache = ConfigCache(tmp_path / "configs.json")
    started = time.perf_counter()
    with pytest.raises(OSError, match=r"its lock file .*configs\.json\.lock cannot be made"):
        cache.put(make_key(), CONFIG, ms=1.0, default_ms=2.0)
    assert time.perf_counter() - started < 5
