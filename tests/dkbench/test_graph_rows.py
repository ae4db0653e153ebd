"""`timing.cuda_graph: [false, true]`: every provider timed eagerly and by CUDA-graph replay in
one run, the graph rows under `NAME+graph` so that they key apart from the eager ones (resume,
gate); bad values refused naming the file, the key and what is allowed; on a GPU, the bundled
decode and varlen steps captured beside their eager rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dkbench.errors import SpecError
from dkbench.gate.compare import run_gate
from dkbench.measure import runner
from dkbench.measure.timing import (
    CUDA_GRAPH,
    DO_BENCH,
    WALLCLOCK,
    Measurement,
    timer_for,
)
from dkbench.results.schema import (
    KEY_COLUMNS,
    RESULTS_FILE,
    read_results,
    rewrite_results,
)
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import Timing, expand, graph_row_name, row_provider

from .specs import needs_interpreter, write_spec

CPU = torch.device("cpu")
DECODE = {"mode": "decode", "seqlen": 64, "batch": 2, "length_spread": 0.5, "heads": 4,
          "kv_heads": 2, "patterns": [{"type": "local_stride", "block_size": 16,
                                       "local_blocks": 1, "vert_stride": 2}]}
BOTH = {"warmup_ms": 1, "rep_ms": 1, "cuda_graph": [False, True]}


# -- the spec --

@pytest.mark.parametrize(("given", "cuda_graph", "interleave"), [
    (False, False, True),
    (True, True, False),               # graph replay alone times one provider at a time
    ([False, True], [False, True], True),  # both: the eager rows stay interleaved
    ([True, False], [False, True], True),
    ([True], True, False),             # one value stands for itself
    ([False], False, True),
])
def test_graph_values(tmp_path: Path, given, cuda_graph, interleave) -> None:
    timing = load_spec(write_spec(tmp_path, timing={"warmup_ms": 1, "rep_ms": 1,
                                                    "cuda_graph": given})).timing
    assert (timing.cuda_graph, timing.interleave) == (cuda_graph, interleave)
    assert timing.graph_rows == isinstance(cuda_graph, list)


def test_both_ways_may_say_interleave(tmp_path: Path) -> None:
    timing = load_spec(write_spec(tmp_path, timing={**BOTH, "interleave": True})).timing
    assert timing.interleave and timing.graph_rows


ALLOWED = "allowed: false (eager), true (graph replay), or [false, true] (both"


@pytest.mark.parametrize(("given", "where"), [
    ("both", "timing.cuda_graph: 'both' is not a boolean"),
    (1, "timing.cuda_graph: 1 is not a boolean"),
    (None, "timing.cuda_graph: null is not a boolean"),
    ([], "timing.cuda_graph: an empty list"),
    ([True, True], "timing.cuda_graph[1]: true is given twice"),
    ([False, "true"], "timing.cuda_graph[1]: 'true' is not a boolean"),
])
def test_bad_graph_values_name_file_key_and_allowed(tmp_path: Path, given, where) -> None:
    path = write_spec(tmp_path, timing={"cuda_graph": given})
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert where in message and ALLOWED in message, message


def test_each_row_is_timed_one_way() -> None:
    both = Timing(cuda_graph=[False, True], warmup_ms=1, rep_ms=1)
    eager, graph = both.eager_pass(), both.graph_pass()
    assert (eager.cuda_graph, eager.interleave) == (False, True)
    assert (graph.cuda_graph, graph.interleave) == (True, False)
    assert timer_for(eager, torch.device("cuda", 0)) == DO_BENCH
    assert timer_for(graph, torch.device("cuda", 0)) == CUDA_GRAPH
    assert timer_for(graph, CPU) == WALLCLOCK
    with pytest.raises(ValueError, match="times each row one way"):
        timer_for(both, CPU)
    assert Timing(cuda_graph=True).eager_pass().cuda_graph is True  # graph-only stays so


def test_graph_rows_are_named_after_their_provider() -> None:
    assert graph_row_name("dkbench") == "dkbench+graph"
    assert row_provider("dkbench+graph") == ("dkbench", True)
    assert row_provider("dkbench") == ("dkbench", False)


# -- the work and its rows --

def _work(tmp_path: Path, done: set | None = None, **overrides) -> list[list[str]]:
    sweep = load_spec(write_spec(tmp_path, **{**DECODE, "providers": ["dkbench", "sdpa_math"],
                                              "baseline": "sdpa_math", "timing": BOTH,
                                              **overrides}))
    cases = expand(sweep)
    plan = runner.RunPlan(tmp_path, cases, sweep.providers, done or set())
    return [names for _, names in runner.pending_work(sweep, plan, sweep.baseline)]


def test_graph_rows_follow_the_eager_ones_baseline_first(tmp_path: Path) -> None:
    assert _work(tmp_path) == [["sdpa_math", "dkbench", "sdpa_math+graph", "dkbench+graph"]]
    eager_only = _work(tmp_path, timing={"warmup_ms": 1, "rep_ms": 1})
    assert eager_only == [["sdpa_math", "dkbench"]]


def test_a_done_graph_row_is_not_run_again(tmp_path: Path) -> None:
    case_id = expand(load_spec(write_spec(tmp_path, **DECODE)))[0].case_id
    assert _work(tmp_path, {(case_id, "dkbench+graph"), (case_id, "sdpa_math")}) == [
        ["dkbench", "sdpa_math+graph"]]


def test_exclusions_take_graph_rows_with_their_provider_or_alone(tmp_path: Path) -> None:
    assert _work(tmp_path, exclude=[{"provider": "dkbench"}]) == [["sdpa_math",
                                                                   "sdpa_math+graph"]]
    assert _work(tmp_path, exclude=[{"provider": ["dkbench+graph"]}]) == [
        ["sdpa_math", "dkbench", "sdpa_math+graph"]]


@pytest.fixture
def graph_measure(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """`measure` as the GPU's graph timer would answer, one median per call from ``times``;
    it refuses a timing that is not the graph pass (only graph rows are timed alone here)."""
    times: list[float] = []

    def measured(fn, timing, device):
        assert timing.cuda_graph is True and not timing.interleave, timing
        fn()
        ms = times.pop(0)
        return Measurement(ms, ms, ms, CUDA_GRAPH, 20)

    monkeypatch.setattr(runner, "measure", measured)
    return times


def _execute(tmp_path: Path, resume: Path | None = None):
    path = write_spec(tmp_path, **{**DECODE, "providers": ["sdpa_math", "dkbench"],
                                   "baseline": "sdpa_math", "timing": BOTH})
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", resume)
    return runner.execute(sweep, path.read_text(), plan, CPU), plan.run_dir


@needs_interpreter
def test_one_run_gives_eager_and_graph_rows_keyed_apart(tmp_path: Path, graph_measure) -> None:
    graph_measure.extend([2.0, 0.5])  # sdpa_math+graph, then dkbench+graph
    rows, run_dir = _execute(tmp_path)
    by = {r.provider: r for r in rows}
    assert list(by) == ["sdpa_math", "dkbench", "sdpa_math+graph", "dkbench+graph"]
    assert all(r.status == "ok" for r in rows), [(r.provider, r.message) for r in rows]
    assert [r.timer for r in rows] == [WALLCLOCK, WALLCLOCK, CUDA_GRAPH, CUDA_GRAPH]
    assert [r.baseline for r in rows] == ["sdpa_math", "sdpa_math", "sdpa_math+graph",
                                          "sdpa_math+graph"]
    # A graph row's speedup is over the baseline's graph row, never over an eager time.
    assert by["dkbench+graph"].speedup == pytest.approx(4.0)
    assert by["sdpa_math+graph"].speedup == pytest.approx(1.0)
    assert by["dkbench+graph"].rel_err < 1e-6  # checked as its eager twin is
    assert by["dkbench+graph"].config == by["dkbench"].config
    frame = read_results(run_dir)
    keys = list(zip(*(frame[c] for c in KEY_COLUMNS)))
    assert len(set(keys)) == len(keys) == 4
    # The gate compares them as rows of their own: every metric; by default each speedup is the
    # one the run measured, a graph row's over the baseline's graph row.
    assert run_gate(run_dir, run_dir, metric="ms").passed
    gated = run_gate(run_dir, run_dir)
    assert gated.passed and gated.against == "sdpa_math"
    assert sorted((c.provider, c.baseline) for c in gated.comparisons) == [
        ("dkbench", pytest.approx(by["dkbench"].speedup)), ("dkbench+graph", pytest.approx(4.0))]
    graphed = run_gate(run_dir, run_dir, against="sdpa_math", providers=["dkbench+graph"])
    assert graphed.passed and [c.baseline for c in graphed.comparisons] == [pytest.approx(4.0)]


@needs_interpreter
def test_a_resumed_run_keeps_the_graph_baseline(tmp_path: Path, graph_measure) -> None:
    graph_measure.extend([2.0, 0.5])
    _, run_dir = _execute(tmp_path)

    def drop_the_graph_row(rows: list[dict[str, str]]) -> bool:
        rows[:] = [r for r in rows if r["provider"] != "dkbench+graph"]
        return True

    assert rewrite_results(run_dir / RESULTS_FILE, drop_the_graph_row)
    graph_measure.append(0.25)
    (row,) = _execute(tmp_path, resume=run_dir)[0]
    assert (row.provider, row.status, row.baseline) == ("dkbench+graph", "ok", "sdpa_math+graph")
    assert row.speedup == pytest.approx(8.0)  # over the graph baseline measured before


# -- on a GPU --

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize(("mode", "page_size"), [("decode", None), ("decode", 16),
                                                 ("prefill_varlen", None)])
def test_the_bundled_inference_steps_are_captured_beside_eager_ones(tmp_path: Path, mode: str,
                                                                    page_size) -> None:
    path = write_spec(tmp_path, device="cuda", dtype="bf16", mode=mode, seqlen=4096, batch=4,
                      length_spread=0.5, heads=16, kv_heads=4, head_dim=128,
                      page_size=page_size,
                      patterns=[{"type": "local_stride", "block_size": 64, "local_blocks": 8,
                                 "vert_stride": 8}],
                      providers=["sdpa_cudnn", "dkbench"], baseline="sdpa_cudnn",
                      timing={"warmup_ms": 5, "rep_ms": 20, "cuda_graph": [False, True]})
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    rows = runner.execute(sweep, path.read_text(), plan, torch.device("cuda"))
    by = {r.provider: r for r in rows}
    assert by["dkbench"].status == "ok" and by["dkbench"].timer == "interleaved", \
        by["dkbench"].message
    graph = by["dkbench+graph"]
    assert (graph.status, graph.timer) == ("ok", CUDA_GRAPH), graph.message
    assert graph.ms > 0 and graph.config == by["dkbench"].config
    for name in ("sdpa_cudnn", "sdpa_cudnn+graph"):  # capturable or saying why not
        assert by[name].status in ("ok", "unsupported"), by[name].message
    if by["sdpa_cudnn+graph"].status == "ok":
        assert graph.speedup == pytest.approx(by["sdpa_cudnn+graph"].ms / graph.ms)


@needs_interpreter
def test_the_run_header_says_each_provider_is_timed_both_ways(tmp_path: Path) -> None:
    from .cli_helpers import flat, invoke, run_dir_of

    spec = write_spec(tmp_path, **{**DECODE, "providers": ["sdpa_math", "dkbench"],
                                   "baseline": "sdpa_math", "timing": BOTH})
    result = invoke("run", spec, "--device", "cpu", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    # No graph is replayed on the CPU: the header does not claim one, and a warning says so.
    assert ("(1 cases x 2 providers, each in a NAME and a NAME+graph row on cpu)"
            in flat(result.stdout)), result.output
    assert ("timing.cuda_graph: the CPU has no CUDA graphs, so every row is timed by the wall "
            "clock (timer interpreter-wallclock), the NAME+graph rows too"
            in flat(result.stderr)), result.output
    frame = read_results(run_dir_of(tmp_path / "out"))
    assert set(frame["timer"]) == {"interpreter-wallclock"}
