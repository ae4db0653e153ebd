"""Resuming a run: the results file that heals (torn last rows set aside), `--resume DIR` alone
running the recorded spec, and a changed SPEC refused."""

from __future__ import annotations

import errno
import shutil
import warnings
from pathlib import Path

import pytest
import yaml

from dkbench.errors import TornRowWarning
from dkbench.measure import runner
from dkbench.results import schema as results
from dkbench.results.merge import merge_runs
from dkbench.results.schema import (
    META_FILE,
    RESULTS_FILE,
    append_row,
    read_meta,
    read_results,
)

from .cli_helpers import flat, invoke, pairs, run_dir_of, run_to_end
from .specs import spec_dict, write_spec

PREPARE_ONE = runner.prepare_one






def four_cases(folder: Path, **overrides) -> Path:
    return write_spec(folder, seqlen=[32, 48], heads=[2, 4], **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished four-row run (spec, run directory); tests copy it before changing it."""
    folder = tmp_path_factory.mktemp("finished")
    spec = four_cases(folder)
    return spec, run_to_end(spec, folder / "out")


def copy_run(finished: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished[1], tmp_path / "run"))


def torn_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(RESULTS_FILE + ".torn-*"))


def tear_last_row(csv: Path, keep: int) -> tuple[bytes, bytes]:
    """Cut the last row after ``keep`` of its bytes; returns (the whole rows, the torn bytes)."""
    data = csv.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    csv.write_bytes(data[:start + keep])
    return data[:start], data[start:start + keep]


# -- one write per row --

def test_append_row_writes_each_row_in_one_call(finished, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [results.ResultRow(**{k: v for k, v in r.items() if k in results.COLUMNS})
            for r in read_results(finished[1]).head(2).to_dict("records")]
    calls: list[bytes] = []
    real = results._write

    def counted(fd: int, data: bytes) -> int:
        calls.append(data)
        return real(fd, data)

    monkeypatch.setattr(results, "_write", counted)
    csv = tmp_path / RESULTS_FILE
    for row in rows:
        append_row(csv, row)
    assert len(calls) == 2  # the header goes out with the first row, in the same call
    assert calls[0].startswith(b"run_id,") and calls[0].count(b"\n") == 2
    assert calls[1].count(b"\n") == 1 and calls[1].endswith(b"\r\n")
    assert csv.read_bytes() == b"".join(calls)


def test_append_never_lands_on_a_partial_line(finished, tmp_path: Path) -> None:
    run_dir = copy_run(finished, tmp_path)
    csv = run_dir / RESULTS_FILE
    whole, torn = tear_last_row(csv, 30)
    row = results.ResultRow(**{k: v for k, v in read_results(finished[1]).iloc[-1].items()
                               if k in results.COLUMNS})
    with pytest.warns(TornRowWarning, match="moved to"):
        append_row(csv, row)
    data = csv.read_bytes()
    assert data.startswith(whole) and data.endswith(b"\r\n")
    assert len(read_results(run_dir)) == 4
    (aside,) = torn_files(run_dir)
    assert aside.read_bytes() == torn


# -- reading heals --

def test_read_results_sets_a_torn_row_aside(finished, tmp_path: Path) -> None:
    run_dir = copy_run(finished, tmp_path)
    csv = run_dir / RESULTS_FILE
    whole, torn = tear_last_row(csv, 57)
    with pytest.warns(TornRowWarning) as caught:
        frame = read_results(run_dir)
    assert len(frame) == 3
    (aside,) = torn_files(run_dir)
    assert str(aside) in str(caught[0].message) and str(csv) in str(caught[0].message)
    assert aside.read_bytes() == torn and csv.read_bytes() == whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # healed once: the next read is quiet
        assert len(read_results(run_dir)) == 3


def test_read_results_of_an_unchangeable_file_reads_whole_rows(
        finished, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = copy_run(finished, tmp_path)
    csv = run_dir / RESULTS_FILE
    tear_last_row(csv, 12)
    before = csv.read_bytes()

    def refused(path: Path, torn: bytes) -> Path:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(results, "_set_aside", refused)
    with pytest.warns(TornRowWarning, match="cannot be set aside: Permission denied"):
        frame = read_results(run_dir)
    assert len(frame) == 3 and csv.read_bytes() == before and not torn_files(run_dir)


@pytest.mark.parametrize("text", [b"\x89PNG\r\n\x1a\n\x00\xff", b"provider,seqlen,ms\nx,10",
                                  b"case_id,provider\n1,dkbench,extra,fields\n"])
def test_files_that_are_not_torn_results_are_left_alone(tmp_path: Path, text: bytes) -> None:
    csv = tmp_path / RESULTS_FILE
    csv.write_bytes(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read_results(csv)
        except Exception:  # noqa: BLE001 - the reader's own complaint is fine; changing it is not
            pass
    assert csv.read_bytes() == text and not torn_files(tmp_path)


def test_a_torn_header_is_set_aside_whole(finished, tmp_path: Path) -> None:
    """A run killed during its very first write (header and row go out together)."""
    run_dir = copy_run(finished, tmp_path)
    csv = run_dir / RESULTS_FILE
    csv.write_bytes(csv.read_bytes()[:40])
    result = invoke("run", finished[0], "-q", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert "its last row was cut off" in flat(result.stderr), result.output
    assert sorted(pairs(run_dir)) == sorted(pairs(finished[1]))


# -- resume re-runs the torn row's case --

def test_resume_reruns_the_torn_rows_case(finished, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = copy_run(finished, tmp_path)
    csv = run_dir / RESULTS_FILE
    everything = pairs(finished[1])
    whole, _ = tear_last_row(csv, 100)
    calls: list[tuple[str, str]] = []

    def prepare_one(ctx, case, name, *args):
        calls.append((case.case_id, name))
        return PREPARE_ONE(ctx, case, name, *args)

    monkeypatch.setattr(runner, "prepare_one", prepare_one)
    result = invoke("run", finished[0], "-q", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    (aside,) = torn_files(run_dir)
    assert f"warning: {csv}: its last row was cut off" in flat(result.stderr), result.output
    assert str(aside) in flat(result.stderr), result.output
    assert calls == [everything[-1]]
    assert pairs(run_dir) == everything
    assert csv.read_bytes().startswith(whole)


def test_merge_never_copies_half_a_row(finished, tmp_path: Path) -> None:
    run_dir = copy_run(finished, tmp_path)
    tear_last_row(run_dir / RESULTS_FILE, 80)
    merged = merge_runs([run_dir], tmp_path / "merged")
    assert merged.rows == 3
    assert any("its last row was cut off" in note for note in merged.notes), merged.notes
    assert len(read_results(tmp_path / "merged")) == 3 and torn_files(run_dir)


# -- --resume DIR alone runs the recorded spec --

def interrupt_at(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    calls = []

    def prepare_one(ctx, case, name, *args):
        calls.append(name)
        if len(calls) == at:
            raise KeyboardInterrupt
        return PREPARE_ONE(ctx, case, name, *args)

    monkeypatch.setattr(runner, "prepare_one", prepare_one)


def test_resume_without_spec_runs_the_recorded_one(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spec, out = four_cases(tmp_path / "specs"), tmp_path / "out"
    interrupt_at(monkeypatch, 3)
    result = invoke("run", spec, "--out", out, "-q")
    assert result.exit_code == 130, result.output
    run_dir = run_dir_of(out)
    hint = flat(result.stderr).split("finish with ")[-1].split()
    assert hint == ["--resume", str(run_dir)], result.output
    spec.unlink()  # the hint must work without the spec file
    monkeypatch.setattr(runner, "prepare_one", PREPARE_ONE)

    result = invoke("run", *hint, "-q")
    assert result.exit_code == 0, result.output
    assert len(pairs(run_dir)) == 4 and len(set(pairs(run_dir))) == 4
    meta = read_meta(run_dir)
    assert "finished" in meta and meta["spec_name"] == "tiny"
    assert yaml.safe_load(meta["spec_text"]) == spec_dict(seqlen=[32, 48], heads=[2, 4])


def test_resume_without_spec_keeps_the_recorded_flags(tmp_path: Path) -> None:
    spec = four_cases(tmp_path, providers=["sdpa_math", "sdpa_flash"])
    out = tmp_path / "out"
    result = invoke("run", spec, "--out", out, "-q", "--providers", "sdpa_math",
                    "--only", "seqlen=48")
    assert result.exit_code == 0, result.output
    run_dir = run_dir_of(out)
    csv = run_dir / RESULTS_FILE
    header, first, second = csv.read_text().splitlines(keepends=True)
    csv.write_text(header + first)

    result = invoke("run", "--resume", run_dir, "-q")
    assert result.exit_code == 0, result.output
    frame = read_results(run_dir)  # no other provider, no other case
    assert sorted(zip(frame["seqlen"], frame["heads"], frame["provider"])) == [
        (48, 2, "sdpa_math"), (48, 4, "sdpa_math")]


def test_resume_refuses_a_changed_spec_naming_the_keys(finished, tmp_path: Path) -> None:
    run_dir = copy_run(finished, tmp_path)
    before = (run_dir / RESULTS_FILE).read_bytes()
    changed = write_spec(tmp_path / "specs", seqlen=[32, 48], heads=[2, 8],
                         timing={"warmup_ms": 2, "rep_ms": 1})
    result = invoke("run", changed, "--resume", run_dir, "-q")
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert (f"--resume {run_dir}: the SPEC given differs from the one recorded in "
            f"{run_dir / META_FILE} in heads, timing; give no SPEC") in message, result.output
    assert "Traceback" not in result.output
    assert (run_dir / RESULTS_FILE).read_bytes() == before

    same = four_cases(tmp_path / "same")  # the same spec from another file still resumes
    result = invoke("run", same, "--resume", run_dir, "-q")
    assert result.exit_code == 0, result.output


def test_resume_without_spec_needs_a_recorded_one(finished, tmp_path: Path) -> None:
    run_dir = copy_run(finished, tmp_path)
    meta = read_meta(run_dir)
    del meta["spec"]
    results.write_meta(run_dir, meta)
    result = invoke("run", "--resume", run_dir, "-q")
    assert result.exit_code == 2, result.output
    assert f"{run_dir / META_FILE} records no spec; give the SPEC it ran" in flat(
        result.stderr), result.output


def test_resume_with_a_recorded_spec_gone_bad_names_the_file_and_key(finished,
                                                                      tmp_path: Path) -> None:
    run_dir = copy_run(finished, tmp_path)
    meta = read_meta(run_dir)
    meta["spec"]["heads"] = "many"
    results.write_meta(run_dir, meta)
    result = invoke("run", "--resume", run_dir, "-q")
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert f"{run_dir / META_FILE} (its recorded spec)" in message and "heads" in message
    assert "Traceback" not in result.output and "pydantic" not in message
