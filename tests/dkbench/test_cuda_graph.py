"""`timing.cuda_graph: true`: which timer runs where, how a graph is recorded and why a step that
cannot be captured becomes an `unsupported` row; on a GPU, the bundled kernel and SDPA captured
and replayed in every training mode, and a host-syncing step refused without breaking the run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dkbench.measure import graphs, runner
from dkbench.measure.graphs import GRAPH_MAX_CALLS, CaptureError, graph_calls, record_graph
from dkbench.measure.providers import PROVIDERS, Unsupported
from dkbench.measure.timing import CUDA_GRAPH, DO_BENCH, WALLCLOCK, measure, timer_for
from dkbench.results.schema import read_meta
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import Timing, expand

from .specs import write_spec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GRAPHS = Timing(cuda_graph=True, warmup_ms=5, rep_ms=20)


# -- on the CPU --

def test_the_timer_follows_the_spec_and_the_device() -> None:
    assert timer_for(GRAPHS, torch.device("cuda", 0)) == CUDA_GRAPH
    assert timer_for(Timing(interleave=False), torch.device("cuda", 0)) == DO_BENCH
    assert timer_for(GRAPHS, torch.device("cpu")) == WALLCLOCK  # the interpreter has no graphs


def test_graph_calls_fill_a_replay_within_bounds() -> None:
    timing = Timing(cuda_graph=True, rep_ms=100)  # 20 replays of 5 ms
    assert graph_calls(0.5, timing) == 10
    assert graph_calls(50.0, timing) == 1
    assert graph_calls(1e-4, timing) == GRAPH_MAX_CALLS


class FakeGraph:
    """Records what a capture did; ``end_error`` is what capture_end raises (an invalidated
    capture), as torch's does after a step synced with the host."""

    def __init__(self, end_error: Exception | None = None) -> None:
        self.events: list[str] = []
        self.end_error = end_error

    def capture_begin(self) -> None:
        self.events.append("begin")

    def capture_end(self) -> None:
        self.events.append("end")
        if self.end_error is not None:
            raise self.end_error


INVALIDATED = RuntimeError("CUDA error: operation failed due to a previous error during capture")


def test_a_recorded_graph_holds_the_calls_between_begin_and_end() -> None:
    graph = FakeGraph()
    record_graph(graph, lambda: graph.events.append("call"), 3)
    assert graph.events == ["begin", "call", "call", "call", "end"]


def test_the_steps_own_error_is_the_reason_and_capture_is_still_ended() -> None:
    graph = FakeGraph(end_error=INVALIDATED)

    def syncs() -> None:
        graph.events.append("call")
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    with pytest.raises(CaptureError) as caught:
        record_graph(graph, syncs, 4)
    assert graph.events == ["begin", "call", "end"]
    assert str(caught.value) == ("cannot be captured in a CUDA graph (timing.cuda_graph): "
                                 "RuntimeError: CUDA error: operation not permitted when stream "
                                 "is capturing")
    assert isinstance(caught.value, Unsupported)  # so its row is `unsupported`


def test_an_invalidated_capture_alone_is_the_reason() -> None:
    with pytest.raises(CaptureError, match="previous error during capture"):
        record_graph(FakeGraph(end_error=INVALIDATED), lambda: None, 2)


def test_a_step_that_cannot_be_captured_gets_an_unsupported_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's sequential path with a measure that records a graph as the GPU path does,
    into a graph that refuses (a CPU has none to capture)."""
    def refusing_measure(fn, timing, device):
        record_graph(FakeGraph(end_error=INVALIDATED), fn, 2)
        raise AssertionError("not reached")

    monkeypatch.setattr(runner, "measure", refusing_measure)
    path = write_spec(tmp_path, timing={"cuda_graph": True, "warmup_ms": 1, "rep_ms": 1})
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    (row,) = runner.execute(sweep, path.read_text(), plan, torch.device("cpu"))
    assert row.status == "unsupported"
    assert row.message == ("cannot be captured in a CUDA graph (timing.cuda_graph): RuntimeError: "
                           "CUDA error: operation failed due to a previous error during capture")
    assert math.isnan(row.ms)


# -- on a GPU --

def gpu_run(tmp_path: Path, mode: str, providers: list[str]):
    path = write_spec(tmp_path, device="cuda", dtype="bf16", mode=mode, seqlen=2048, heads=8,
                      kv_heads=2, head_dim=128, providers=providers, baseline=providers[-1],
                      patterns=[{"type": "local_stride", "block_size": 64, "local_blocks": 4,
                                 "vert_stride": 4}],
                      timing={"cuda_graph": True, "warmup_ms": 5, "rep_ms": 20})
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    rows = runner.execute(sweep, path.read_text(), plan, torch.device("cuda"))
    return rows, read_meta(plan.run_dir)


@needs_cuda
def test_the_bundled_forward_is_captured_and_replayed(tmp_path: Path) -> None:
    device = torch.device("cuda")
    sweep = load_spec(write_spec(tmp_path, device="cuda", dtype="bf16", seqlen=4096, heads=8,
                                 kv_heads=2, head_dim=128,
                                 patterns=[{"type": "local_stride", "block_size": 64,
                                            "local_blocks": 4, "vert_stride": 4}]))
    (case,) = expand(sweep)
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    prepared = PROVIDERS["dkbench"]().prepare(case, layout, sweep, device, case.head_dim ** -0.5)
    q = torch.randn(1, 8, 4096, 128, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 4096, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    step = runner.make_step("fwd", prepared.attn, q, k, v)
    want = step().float()
    graphed = measure(step, GRAPHS, device)
    eager = measure(step, Timing(interleave=False, warmup_ms=5, rep_ms=20), device)
    assert graphed.timer == CUDA_GRAPH and graphed.samples == graphs.GRAPH_REPLAYS
    assert 0 < graphed.ms < 2 * eager.ms  # no launch overhead, no L2 flush: never slower
    assert torch.equal(step().float(), want)  # replays left the step as it was


@needs_cuda
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
def test_every_training_mode_is_timed_by_graph_replay(tmp_path: Path, mode: str) -> None:
    rows, meta = gpu_run(tmp_path, mode, ["dkbench", "sdpa_cudnn"])
    assert [(r.provider, r.status, r.timer) for r in rows] == [
        ("sdpa_cudnn", "ok", CUDA_GRAPH), ("dkbench", "ok", CUDA_GRAPH)], [r.message for r in rows]
    assert all(r.ms > 0 and r.speedup > 0 for r in rows)
    if "unavailable" not in meta["telemetry"]:
        assert all(r.clock_mhz_median > 0 and r.power_w_median > 0 for r in rows)


@needs_cuda
def test_a_host_sync_is_refused_and_the_process_goes_on() -> None:
    device = torch.device("cuda")
    x = torch.randn(1024, device=device)

    def syncs() -> float:
        return (x * 2).sum().item()

    with pytest.raises(CaptureError, match="cannot be captured in a CUDA graph"):
        measure(syncs, GRAPHS, device)
    # a failed capture must not break what follows: random numbers, eager work, a new graph
    assert torch.randn(8, device=device).isfinite().all()
    assert measure(lambda: x * 2, GRAPHS, device).ms > 0
