"""`dkbench run --resume` against run directories that once resumed into silently mixed results:
another machine's environment, rows of another run, a stale "finished" after an interrupted
resume, and an --out that is (or is inside) a run directory. Each is refused in one line naming
the file or flag and what is allowed (exit 2), or ends with every row kept and none twice."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from dkbench.results import schema as results
from dkbench.results.merge import merge_runs
from dkbench.results.schema import META_FILE, RESULTS_FILE, read_meta

from .cli_helpers import invoke, pairs, run_to_end
from .specs import write_spec
from .test_break_run import refused
from .test_resume import interrupt_at


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the tiny spec over two lengths, --only the first (sdpa_math only)."""
    folder = tmp_path_factory.mktemp("finished")
    return run_to_end(write_spec(folder, seqlen=[32, 64]), folder / "out", "--only", "seqlen=32")


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "out" / finished.name))


def _meta(run_dir: Path, **changes: object) -> None:
    results.write_meta(run_dir, {**read_meta(run_dir), **changes})


# -- meta.json on disk before it replaces the old one --

def test_write_meta_syncs_the_new_file_before_renaming_it(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(results.os, "fsync", fsync)
    results.write_meta(tmp_path, {"run_id": "a"})
    # was never synced: a crash soon after could leave an empty meta.json (ext4, XFS)
    assert (tmp_path / META_FILE).stat().st_ino in synced
    assert read_meta(tmp_path) == {"run_id": "a"}


# -- a meta.json that cannot be read --

@pytest.mark.parametrize("spec", [False, True])
def test_resume_with_a_torn_meta_says_how_to_finish(run_copy: Path, tmp_path: Path,
                                                    spec: bool) -> None:
    (run_copy / META_FILE).write_text('{"run_id": "tiny-')  # a machine crashed mid-write
    given = [write_spec(tmp_path, seqlen=[32, 64])] if spec else []
    result = invoke("run", *given, "--resume", run_copy, "-q")
    # was "cannot be read (Expecting value ...)" and no way on named
    refused(result, f"--resume {run_copy}: {run_copy / META_FILE}: not valid JSON",
            "move it aside and give the SPEC the run ran")
    (run_copy / META_FILE).unlink()
    result = invoke("run", write_spec(tmp_path, seqlen=[32, 64]), "--resume", run_copy, "-q")
    assert result.exit_code == 0, result.output  # as the message says
    assert len(set(pairs(run_copy))) == len(pairs(run_copy)) == 2


# -- --resume given a file --

@pytest.mark.parametrize("name", [RESULTS_FILE, META_FILE])
def test_resume_of_a_runs_file_names_its_directory(run_copy: Path, name: str) -> None:
    result = invoke("run", "--resume", run_copy / name, "-q")
    # was "not a run directory (no results.csv or meta.json)", of a results.csv
    refused(result, f"--resume {run_copy / name}: is a file; give the run directory",
            f"(--resume {run_copy})")


# -- a results.csv a resumed run cannot add to --

@pytest.mark.parametrize(("text", "words"), [
    # was exit 0: the new rows written under these three columns only, every measurement dropped
    (b"run_id,case_id,provider\r\n", "its header lacks the columns gpu, interpreter, mode"),
    (b"provider,seqlen,ms\r\nx,10,1\r\n", "its header lacks the columns case_id, gpu"),  # KeyError
    (b"\xff\xfe\x00bad\n", "not a UTF-8 CSV"),  # was a UnicodeDecodeError traceback
])
def test_resume_refuses_a_results_csv_it_cannot_add_to(run_copy: Path, text: bytes,
                                                        words: str) -> None:
    csv = run_copy / RESULTS_FILE
    csv.write_bytes(text)
    result = invoke("run", "--resume", run_copy, "--only", "seqlen=64", "-q")
    refused(result, f"--resume {run_copy}: {csv}: {words}")
    assert csv.read_bytes() == text


def test_resume_refuses_a_row_with_more_fields_than_the_header(run_copy: Path) -> None:
    csv = run_copy / RESULTS_FILE
    csv.write_bytes(csv.read_bytes().rstrip(b"\r\n") + b",x,y\r\n")
    result = invoke("run", "--resume", run_copy, "--only", "seqlen=64", "-q")
    # was exit 0: pandas took the extra cells as an index, so every cell moved two columns over
    # (this row read back as case_id 'fwd', provider 'float32')
    refused(result, f"{csv}: line 2 has more fields")


# -- another machine's run --

@pytest.mark.parametrize("key", ["gpu", "torch", "triton"])
def test_resume_refuses_a_run_of_another_environment(run_copy: Path, key: str) -> None:
    meta = read_meta(run_copy)
    _meta(run_copy, environment={**meta["environment"], key: "NVIDIA H100 or 9.9"})
    before = (run_copy / RESULTS_FILE).read_bytes()
    result = invoke("run", "--resume", run_copy, "--only", "seqlen=64", "-q")
    # was exit 0: this machine's rows appended, and meta.json's environment overwritten
    refused(result, f"--resume {run_copy}: that run ran with {key} 'NVIDIA H100 or 9.9' (here: "
            f"{meta['environment'][key]!r})", "dkbench merge")
    assert (run_copy / RESULTS_FILE).read_bytes() == before
    assert read_meta(run_copy)["environment"][key] == "NVIDIA H100 or 9.9"


# -- rows of another run --

def test_resume_refuses_rows_of_another_run(run_copy: Path) -> None:
    csv = run_copy / RESULTS_FILE
    csv.write_bytes(csv.read_bytes().replace(run_copy.name.encode(), b"tiny-other", 1))
    header, first = csv.read_bytes().splitlines(keepends=True)[:2]
    assert first.startswith(b"tiny-other,")
    result = invoke("run", "--resume", run_copy, "--only", "seqlen=64", "-q")
    # was exit 0: the other run's row counted as done, its case never measured in this run
    refused(result, f"{csv} row 1 is of run 'tiny-other', not of this run ({run_copy.name!r}",
            "dkbench merge")


def test_resume_of_a_renamed_or_merged_run_still_runs(run_copy: Path, tmp_path: Path) -> None:
    renamed = run_copy.rename(run_copy.with_name("renamed"))
    result = invoke("run", "--resume", renamed, "--only", "seqlen=64", "-q")
    assert result.exit_code == 0, result.output  # old rows of the recorded run_id, new of its name
    assert len(set(pairs(renamed))) == len(pairs(renamed)) == 2

    merged = tmp_path / "merged"
    merge_runs([renamed], merged)
    csv = merged / RESULTS_FILE
    header, *lines = csv.read_bytes().splitlines(keepends=True)
    csv.write_bytes(header + lines[0])
    result = invoke("run", "--resume", merged, "-q")
    assert result.exit_code == 0, result.output  # its rows keep the run_ids of its inputs
    assert len(set(pairs(merged))) == len(pairs(merged)) == 2


def test_resume_without_meta_refuses_rows_of_another_spec(run_copy: Path, tmp_path: Path) -> None:
    (run_copy / META_FILE).unlink()  # a run copied without it, or from before meta.json
    before = (run_copy / RESULTS_FILE).read_bytes()
    other = write_spec(tmp_path, name="other", seqlen=[32, 64], heads=[4])
    result = invoke("run", other, "--resume", run_copy, "-q")
    # was exit 0: the other spec's rows appended beside tiny's, in one results.csv
    refused(result, f"--resume {run_copy}: {run_copy / RESULTS_FILE} row 1 (case_id",
            f"provider sdpa_math) is of no case of {other}", "resume it with the SPEC it ran")
    assert (run_copy / RESULTS_FILE).read_bytes() == before
    same = write_spec(tmp_path / "same", seqlen=[32, 64])
    result = invoke("run", same, "--resume", run_copy, "-q")
    assert result.exit_code == 0, result.output  # its own spec still finishes it
    assert len(set(pairs(run_copy))) == len(pairs(run_copy)) == 2


# -- two runs writing one directory --

def test_resume_of_a_run_still_being_written_is_refused(run_copy: Path) -> None:
    from dkbench.commands.run import LOCK_FILE

    before = (run_copy / RESULTS_FILE).read_bytes()
    fd = os.open(run_copy / LOCK_FILE, os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the run writing it holds it
        result = invoke("run", "--resume", run_copy, "--only", "seqlen=64", "-q")
        # was exit 0: both measured the missing case, each appending its row (rows twice)
        refused(result, f"--resume {run_copy}: another dkbench run is writing to it now",
                "let that one end")
        assert (run_copy / RESULTS_FILE).read_bytes() == before
    finally:
        os.close(fd)
    result = invoke("run", "--resume", run_copy, "--only", "seqlen=64", "-q")
    assert result.exit_code == 0, result.output  # the lock goes with the run that held it
    assert len(set(pairs(run_copy))) == len(pairs(run_copy)) == 2
    result = invoke("run", "--resume", run_copy, "-q")
    assert result.exit_code == 0, result.output  # and a run's own lock is released when it ends


# -- a finished run resumed --

def test_resume_of_a_finished_run_changes_nothing(run_copy: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    before = {name: (run_copy / name).read_bytes() for name in (META_FILE, RESULTS_FILE)}
    interrupt_at(monkeypatch, 1)  # nothing may be prepared
    result = invoke("run", "--resume", run_copy)
    assert result.exit_code == 0, result.output
    assert f"Nothing left to run: {run_copy} already holds every row" in result.stdout
    # was a fresh "started", "finished" and environment in meta.json, for no row measured
    assert {name: (run_copy / name).read_bytes() for name in before} == before


# -- a finished run resumed, then interrupted --

def test_interrupted_resume_of_a_finished_run_is_not_finished(
        run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_meta(run_copy)["finished"]
    interrupt_at(monkeypatch, 1)
    result = invoke("run", "--resume", run_copy, "--only", "seqlen=64", "-q")
    assert result.exit_code == 130, result.output
    # was the first run's "finished": merge then called the half-done run finished
    assert read_meta(run_copy).get("finished") is None
    assert len(pairs(run_copy)) == 1
    monkeypatch.undo()
    result = invoke("run", "--resume", run_copy, "--only", "seqlen=64", "-q")
    assert result.exit_code == 0, result.output
    assert read_meta(run_copy)["finished"] and len(set(pairs(run_copy))) == 2


# -- a resume of some providers or cases only --

@pytest.mark.parametrize("flags", [("--providers", "sdpa_efficient"), ("--only", "seqlen=64")])
def test_a_narrower_resume_leaves_the_rest_to_a_later_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: tuple[str, str]) -> None:
    spec = write_spec(tmp_path, seqlen=[32, 48, 64], providers=["sdpa_math", "sdpa_efficient"],
                      baseline="sdpa_math",
                      timing={"warmup_ms": 1, "rep_ms": 1, "interleave": False})
    interrupt_at(monkeypatch, 3)  # seqlen 32's two rows written
    assert invoke("run", spec, "--out", tmp_path / "out", "-q").exit_code == 130
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "out").iterdir()
    result = invoke("run", "--resume", run_dir, *flags, "-q")
    assert result.exit_code == 0, result.output
    assert read_meta(run_dir)["providers"] == ["sdpa_math", "sdpa_efficient"]
    assert read_meta(run_dir)["only"] == []
    assert read_meta(run_dir)["baseline"] == "sdpa_math"  # was null after --providers
    result = invoke("run", "--resume", run_dir, "-q")
    assert result.exit_code == 0, result.output
    # was "Nothing left to run: ... already holds every row": the narrower flags had replaced
    # the recorded ones, so the rows they left out were never measured
    got = pairs(run_dir)
    assert len(got) == len(set(got)) == 6


def test_resumes_of_other_values_record_them_all(run_copy: Path) -> None:
    result = invoke("run", "--resume", run_copy, "--only", "seqlen=64", "-q")
    assert result.exit_code == 0, result.output
    assert read_meta(run_copy)["only"] == ["seqlen=32", "seqlen=64"]  # was ["seqlen=64"]


# -- --out that is a run directory --

@pytest.mark.parametrize("below", ["", "sub", "sub/deeper"])
def test_out_that_is_or_is_inside_a_run_is_refused(run_copy: Path, tmp_path: Path,
                                                   below: str) -> None:
    out = run_copy / below if below else run_copy
    before = sorted(os.listdir(run_copy))
    result = invoke("run", write_spec(tmp_path, seqlen=[32, 64]), "--out", out, "-q")
    # was exit 0: a new run directory nested in the old run, where merge and plot never look
    refused(result, f"--out {out}:", f"holds a run ({META_FILE} or {RESULTS_FILE})",
            f"give --resume {run_copy} to finish that run")
    assert sorted(os.listdir(run_copy)) == before


def test_out_beside_runs_still_runs(run_copy: Path, tmp_path: Path) -> None:
    result = invoke("run", write_spec(tmp_path), "--out", run_copy.parent, "-q")
    assert result.exit_code == 0, result.output
    assert len([p for p in run_copy.parent.iterdir() if p.is_dir()]) == 2
    assert json.loads((run_copy / META_FILE).read_text())["finished"]
