"""Sweeps across GPUs and machines, on the CPU: shards, merge, the worker pool (`--gpus cpu:N`)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from dkbench.errors import BadInputError
from dkbench.measure import parallel, runner
from dkbench.measure.shard import (
    Shard,
    case_cost,
    largest_first,
    parse_shard,
    shard_cases,
)
from dkbench.results.schema import META_FILE, RESULTS_FILE, read_meta, read_results
from dkbench.spec.load import load_spec
from dkbench.spec.patterns import LocalStridePattern
from dkbench.spec.sweep import expand

from .cli_helpers import flat, invoke, run_dir_of
from .specs import needs_interpreter, write_spec

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")





def seven_cases(folder: Path, **overrides) -> Path:
    """Seven cases of different and equal costs (b2 s32 h2 costs what b1 s32 h4 does)."""
    return write_spec(folder, batch=[1, 2], seqlen=[32, 64], heads=[2, 4],
                      exclude=[{"batch": 2, "seqlen": 64, "heads": 4}], **overrides)


def triples(run_dir: Path) -> list[tuple[str, str, str]]:
    frame = read_results(run_dir)
    return sorted(zip(frame["case_id"], frame["provider"], frame["status"]))


# -- shards --

@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_cover_every_case_once(tmp_path: Path, count: int) -> None:
    cases = expand(load_spec(seven_cases(tmp_path)))
    assert len(cases) == 7
    shards = [shard_cases(cases, Shard(i, count)) for i in range(1, count + 1)]
    ids = [c.case_id for shard in shards for c in shard]
    assert sorted(ids) == sorted(c.case_id for c in cases)  # all of them, none twice
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for shard in shards:  # spec order kept inside a shard
        assert [c.case_id for c in shard] == [c.case_id for c in cases if c in shard]
    # Deterministic: a fresh load, and the cases in any order, give the same partition.
    again = expand(load_spec(seven_cases(tmp_path / "again")))
    shuffled = random.Random(count).sample(again, len(again))
    for i, shard in enumerate(shards, start=1):
        assert {c.case_id for c in shard_cases(shuffled, Shard(i, count))} == {
            c.case_id for c in shard}


def test_shards_are_dealt_largest_first(tmp_path: Path) -> None:
    cases = expand(load_spec(seven_cases(tmp_path)))
    order = [cases[i] for i in largest_first(cases)]
    assert [case_cost(c) for c in order] == sorted(map(case_cost, cases), reverse=True)
    for i in (1, 2, 3):  # the three largest go one to each shard
        assert order[i - 1] in shard_cases(cases, Shard(i, 3))
    costs = [sum(map(case_cost, shard_cases(cases, Shard(i, 3)))) for i in (1, 2, 3)]
    # Round-robin over a descending list: shard costs fall with the index, by less than one case.
    assert costs == sorted(costs, reverse=True) and costs[0] - costs[-1] <= case_cost(order[0])


@pytest.mark.parametrize(("text", "message"), [
    ("0/3", "I must be between 1 and N"), ("4/3", "I must be between 1 and N"),
    ("1/0", "I must be between 1 and N"), ("2", "expected I/N"), ("a/b", "expected I/N"),
])
def test_bad_shard_exits_2(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        parse_shard(text)
    out = tmp_path / "out"
    result = invoke("run", write_spec(tmp_path), "--out", out, "-q", "--shard", text)
    assert result.exit_code == 2, result.output
    assert message in flat(result.stderr), result.output
    assert not out.exists()


@pytest.fixture(scope="module")
def shard_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The seven-case spec run as three shards (sdpa_math only: fast)."""
    folder = tmp_path_factory.mktemp("shards")
    spec = seven_cases(folder)
    dirs = []
    for i in (1, 2, 3):
        result = invoke("run", spec, "--out", folder / f"s{i}", "-q", "--shard", f"{i}/3")
        assert result.exit_code == 0, result.output
        dirs.append(run_dir_of(folder / f"s{i}"))
    return spec, dirs


def test_shard_runs_its_share(shard_runs: tuple[Path, list[Path]]) -> None:
    spec, dirs = shard_runs
    cases = expand(load_spec(spec))
    for i, run_dir in enumerate(dirs, start=1):
        assert read_meta(run_dir)["shard"] == f"{i}/3"
        want = {c.case_id for c in shard_cases(cases, Shard(i, 3))}
        assert set(read_results(run_dir)["case_id"]) == want


def test_shard_with_no_cases_runs_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("run", write_spec(tmp_path), "--out", out, "-q", "--shard", "2/3")
    assert result.exit_code == 0, result.output
    assert "Shard 2/3 has no cases (the sweep has 1); nothing to run." in flat(result.stdout)
    assert not out.exists()


def test_resume_needs_the_same_shard(shard_runs: tuple[Path, list[Path]]) -> None:
    spec, dirs = shard_runs
    result = invoke("run", spec, "-q", "--resume", dirs[1])
    assert result.exit_code == 2, result.output
    assert "that run is shard 2/3; give --shard 2/3 to finish it" in flat(result.stderr)
    result = invoke("run", spec, "-q", "--resume", dirs[1], "--shard", "2/3")
    assert result.exit_code == 0, result.output


# -- merge --

def test_merge_happy_path(shard_runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    spec, dirs = shard_runs
    out = tmp_path / "merged"
    result = invoke("merge", *dirs, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"Merged 7 rows from 3 run directories (shards 1/3, 2/3, 3/3) into {out}" in flat(
        result.stdout)
    assert "warning" not in result.output
    frame = read_results(out)
    assert sorted(frame["case_id"]) == sorted(c.case_id for c in expand(load_spec(spec)))
    assert set(frame["status"]) == {"ok"}
    header = (dirs[0] / RESULTS_FILE).read_text().splitlines()[0]
    lines = {line for d in dirs for line in (d / RESULTS_FILE).read_text().splitlines()[1:]}
    assert (out / RESULTS_FILE).read_text().splitlines()[0] == header
    assert set((out / RESULTS_FILE).read_text().splitlines()[1:]) == lines  # rows kept verbatim
    meta = read_meta(out)
    assert meta["shards"] == ["1/3", "2/3", "3/3"] and meta["shard"] is None
    assert [m["run_dir"] for m in meta["merged_from"]] == [str(d) for d in dirs]
    assert meta["spec_name"] == "tiny" and meta["missing_cases"] == 0 and "finished" in meta


def test_merge_warns_about_missing_shards(shard_runs: tuple[Path, list[Path]],
                                          tmp_path: Path) -> None:
    _, dirs = shard_runs
    missing = len(read_results(dirs[1])["case_id"].unique())
    result = invoke("merge", dirs[0], dirs[2], "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    err = flat(result.stderr)
    assert f"warning: {missing} of 7 cases of the spec have no row" in err, result.output
    assert "shards not among the inputs: 2/3" in err, result.output


def test_merge_refuses_another_spec(shard_runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, dirs = shard_runs
    other = seven_cases(tmp_path, name="other", filename="other.yaml")
    assert invoke("run", other, "--out", tmp_path / "o", "-q", "--shard", "1/3").exit_code == 0
    other_dir = run_dir_of(tmp_path / "o")
    result = invoke("merge", dirs[0], other_dir, "--out", tmp_path / "merged")
    assert result.exit_code == 2, result.output
    assert f"{other_dir} is a run of a different spec" in flat(result.stderr), result.output
    assert "('other' vs " in flat(result.stderr), result.output
    assert not (tmp_path / "merged").exists()
    result = invoke("merge", dirs[0], other_dir, "--out", tmp_path / "merged", "--force")
    assert result.exit_code == 0, result.output
    assert "(merged anyway: --force)" in flat(result.stderr), result.output


def test_merge_names_what_differs_between_specs_of_one_name(
        shard_runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, shared = shard_runs
    dirs = [shared[0], tmp_path / "copy" / shared[1].name]  # the fixture's runs stay as they are
    shutil.copytree(shared[1], dirs[1])
    meta_path = dirs[1] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["spec"]["check"]["rtol"]["float64"] = 1e-9  # as a later version's default might add
    meta_path.write_text(json.dumps(meta))
    result = invoke("merge", dirs[0], dirs[1], "--out", tmp_path / "merged")
    assert result.exit_code == 2, result.output
    name = meta["spec_name"]
    assert (f"{dirs[1]} is a run of a different spec than {dirs[0]} (both {name!r}; they "
            "differ in check)") in flat(result.stderr), result.output


def test_merge_refuses_another_environment(shard_runs: tuple[Path, list[Path]],
                                           tmp_path: Path) -> None:
    _, dirs = shard_runs
    copy = shutil.copytree(dirs[1], tmp_path / "elsewhere")
    meta = read_meta(copy)
    meta["environment"]["torch"] = "0.0.1"
    (copy / META_FILE).write_text(json.dumps(meta))
    result = invoke("merge", dirs[0], copy, "--out", tmp_path / "merged")
    assert result.exit_code == 2, result.output
    assert f"{copy} ran with torch '0.0.1'" in flat(result.stderr), result.output
    assert invoke("merge", dirs[0], copy, "--out", tmp_path / "merged", "--force").exit_code == 0


def test_merge_duplicates(shard_runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, dirs = shard_runs
    copy = shutil.copytree(dirs[0], tmp_path / "rerun")
    text = (copy / RESULTS_FILE).read_text()
    (copy / RESULTS_FILE).write_text(text.replace(",ok,,", ",error,rerun,"))
    out = tmp_path / "merged"
    result = invoke("merge", dirs[0], copy, "--out", out)
    assert result.exit_code == 2, result.output
    assert f"shard 1/3 is given 2 times ({dirs[0]}, {copy})" in flat(result.stderr)
    # Labelled another shard, the copy's rows are still the same cases'.
    meta = json.loads((copy / META_FILE).read_text())
    (copy / META_FILE).write_text(json.dumps({**meta, "shard": "2/3"}))
    result = invoke("merge", dirs[0], copy, "--out", out)
    assert result.exit_code == 2, result.output
    rows = len(read_results(dirs[0]))
    assert f"{rows} (case_id, provider) rows appear in more than one place" in flat(result.stderr)
    assert "--force keeps the last one" in flat(result.stderr)

    result = invoke("merge", dirs[0], copy, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert f"{rows} duplicate rows: kept the one from the last input given" in flat(result.stderr)
    frame = read_results(out)
    assert len(frame) == rows and set(frame["status"]) == {"error"}  # the last one won

    result = invoke("merge", dirs[0], "--out", out)
    assert result.exit_code == 2, result.output
    assert f"--out {out}: already holds a run" in flat(result.stderr), result.output


def test_merge_bad_input(shard_runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    result = invoke("merge", tmp_path, "--out", tmp_path / "merged")
    assert result.exit_code == 2, result.output
    assert f"{tmp_path}: not a run directory" in flat(result.stderr), result.output
    broken = shutil.copytree(shard_runs[1][0], tmp_path / "broken")
    with open(broken / RESULTS_FILE, "a") as fh:
        fh.write("a,b,c," * 20 + "\n")
    result = invoke("merge", broken, "--out", tmp_path / "merged")
    assert result.exit_code == 2, result.output
    line = len(read_results(shard_runs[1][0])) + 2
    assert f"{broken / RESULTS_FILE}: line {line} has more fields than the header" in flat(
        result.stderr), result.output


# -- the worker pool --

def test_parse_gpus() -> None:
    assert [(s.label, s.cuda) for s in parallel.parse_gpus("cpu:2")] == [("cpu 0", False),
                                                                         ("cpu 1", False)]
    assert parallel.parse_gpus("cpu:1")[0].env() == {"CUDA_VISIBLE_DEVICES": "",
                                                     "TRITON_INTERPRET": "1"}
    for text, message in (("cpu:0", "cpu:N needs N from 1 to"),
                          ("cpu:100000", "cpu:N needs N from 1 to"),  # a process a core at most
                          ("gpu0", "expected all, GPU indices")):
        with pytest.raises(BadInputError, match=message):
            parallel.parse_gpus(text)
    assert parallel.describe_exit(-11) == "-11 (SIGSEGV)" and parallel.describe_exit(3) == "3"


@NO_GPU
def test_gpus_without_gpu_exits_2(tmp_path: Path) -> None:
    result = invoke("run", write_spec(tmp_path), "--out", tmp_path / "out", "--gpus", "all")
    assert result.exit_code == 2, result.output
    assert "--gpus all: no CUDA GPU is visible (--gpus cpu:N runs N CPU worker processes" in flat(
        result.stderr), result.output


def test_cpu_workers_contradict_a_cuda_spec(tmp_path: Path) -> None:
    result = invoke("run", write_spec(tmp_path, device="cuda"), "--out", tmp_path / "out",
                    "--gpus", "cpu:2")
    assert result.exit_code == 2, result.output
    assert "--gpus cpu:2 runs on cpu, but the device asked for" in flat(result.stderr)


def test_run_case_turns_a_broken_case_into_rows(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, *args):
        raise ValueError("no such layout")

    path = write_spec(tmp_path, providers=["sdpa_math", "sdpa_flash"])
    sweep = load_spec(path)
    # Broken after the spec was validated (validation builds the layout too): the run meets it.
    monkeypatch.setattr(LocalStridePattern, "layout", broken)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    rows = runner.execute(sweep, path.read_text(), plan, torch.device("cpu"))
    assert [(r.provider, r.status) for r in rows] == [("sdpa_math", "error"),
                                                      ("sdpa_flash", "error")]
    assert rows[0].message == "building the case failed: ValueError: no such layout"


def pool_spec(folder: Path, **overrides) -> Path:
    return write_spec(folder, seqlen=[32, 48], heads=[2, 4], exclude=[{"seqlen": 48, "heads": 2}],
                      providers=["sdpa_math", "dkbench"], baseline="sdpa_math", **overrides)


@needs_interpreter
def test_cpu_workers_match_a_serial_run(tmp_path: Path) -> None:
    spec = pool_spec(tmp_path)
    assert invoke("run", spec, "--out", tmp_path / "serial", "-q").exit_code == 0
    result = invoke("run", spec, "--out", tmp_path / "pool", "--gpus", "cpu:2")
    assert result.exit_code == 0, result.output
    assert "(3 cases x 2 providers on 2 workers (cpu 0, cpu 1))" in flat(result.stdout)
    assert "ms (speedup vs sdpa_math)" in flat(result.stdout)  # the summary table
    serial, pool = run_dir_of(tmp_path / "serial"), run_dir_of(tmp_path / "pool")
    assert triples(pool) == triples(serial)
    assert {s for _, _, s in triples(pool)} == {"ok"}
    frame = read_results(pool)
    assert set(frame["interpreter"]) == {True} and set(frame["run_id"]) == {pool.name}
    for _, rows in frame.groupby("case_id"):  # the baseline ran first, in the same worker
        base = rows[rows["provider"] == "sdpa_math"].iloc[0]
        mine = rows[rows["provider"] == "dkbench"].iloc[0]
        assert rows.index[0] < rows.index[1] and rows["provider"].iloc[0] == "sdpa_math"
        assert base["speedup"] == 1.0
        # Timed together, interleaved: the median of per-round ratios, inside their p20-p80.
        assert 0 < mine["speedup_p20"] <= mine["speedup"] <= mine["speedup_p80"]
    meta = read_meta(pool)
    assert meta["gpus"] == "cpu:2" and meta["workers"] == ["cpu 0", "cpu 1"]
    assert meta["environment"]["interpreter"] is True and "finished" in meta
    assert sorted(meta["worker_environments"]) == ["cpu 0", "cpu 1"]


@needs_interpreter
@pytest.mark.parametrize("interleave", [True, False])
def test_a_dying_worker_costs_only_its_case(tmp_path: Path, interleave: bool) -> None:
    spec = pool_spec(tmp_path, timing={"warmup_ms": 1, "rep_ms": 1, "interleave": interleave})
    cases = expand(load_spec(spec))
    victim = max(cases, key=case_cost).case_id  # handed out first
    result = invoke("run", spec, "--out", tmp_path / "out", "-q", "--gpus", "cpu:2",
                    env={parallel.CRASH_ENV: f"{victim}:dkbench"})
    assert result.exit_code == 0, result.output
    err = flat(result.stderr)
    assert "died with exit code 3; starting a replacement (1 of 2 restarts)" in err, result.output
    frame = read_results(run_dir_of(tmp_path / "out")).set_index(["case_id", "provider"])
    assert len(frame) == 6
    # Timed alone, the baseline's row was sent before the crash; timed interleaved, the case's
    # rows come only once all of them are timed, so the crash takes both.
    dead = [frame.loc[(victim, "dkbench")]]
    if interleave:
        dead.append(frame.loc[(victim, "sdpa_math")])
    else:
        assert frame.loc[(victim, "sdpa_math"), "status"] == "ok"  # measured before the crash
    for row in dead:
        assert row["status"] == "error"
        assert row["message"].startswith("worker on cpu ") and row["message"].endswith(
            " died with exit code 3 while running this case")
    others = frame.drop(index=victim, level="case_id")
    assert set(others["status"]) == {"ok"}, others["message"].tolist()


@needs_interpreter
def test_a_gpu_is_dropped_after_its_restarts(tmp_path: Path) -> None:
    spec = pool_spec(tmp_path)
    sweep = load_spec(spec)
    cases = expand(sweep)
    victim = max(cases, key=case_cost).case_id
    plan = runner.plan_run(sweep, cases, sweep.providers, tmp_path / "out", None)
    warnings: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(parallel.CRASH_ENV, victim)
        with pytest.raises(parallel.NoWorkersLeft, match="2 cases were not run"):
            parallel.execute_parallel(sweep, spec.read_text(), plan, parallel.parse_gpus("cpu:1"),
                                      on_warning=warnings.append, max_restarts=0)
    assert warnings == ["cpu 0 dropped after 1 worker death (the last died with exit code 3); "
                        "the other workers carry on"]
    assert triples(plan.run_dir) == [(victim, "dkbench", "error"), (victim, "sdpa_math", "error")]
    assert "finished" not in read_meta(plan.run_dir)  # --resume finishes it


def _report_sigint(queue) -> None:
    import signal

    queue.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_a_worker_starts_with_ctrl_c_left_to_the_parent() -> None:
    import multiprocessing as mp
    import signal

    from dkbench.measure.parallel import _sigint_ignored

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    before = signal.getsignal(signal.SIGINT)  # a background job's test runner ignores it
    with _sigint_ignored():
        proc = ctx.Process(target=_report_sigint, args=(queue,))
        proc.start()
    assert signal.getsignal(signal.SIGINT) is before  # the parent's, back
    assert queue.get(timeout=60) is True  # a Ctrl-C while it imports is not the worker's
    proc.join(timeout=60)


def test_a_worker_uses_the_parents_calibration_only_for_its_own_gpu(monkeypatch) -> None:
    from dkbench.measure.calibrate import Calibration
    from dkbench.measure.parallel import worker_calibration

    cal = Calibration(gpu="NVIDIA H200", capability="9.0", torch="", triton="",
                      matmul_tflops={"bfloat16": 700.0}, copy_gbs=4000.0, sm_clock_mhz=None,
                      measured_at="")
    assert worker_calibration(cal, torch.device("cpu")) is None
    assert worker_calibration(None, torch.device("cuda", 0)) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert worker_calibration(cal, torch.device("cuda", 1)) is cal
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    assert worker_calibration(cal, torch.device("cuda", 1)) is None
