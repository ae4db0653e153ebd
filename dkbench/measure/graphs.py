"""Timing by CUDA-graph replay (`timing.cuda_graph: true`, or the `NAME+graph` rows of
`[false, true]`): a step captured once, many calls to a graph, replayed, so no launch overhead is
timed. Replays do not flush L2 between calls.

A step that cannot be captured (it syncs with the host, or its library refuses capture) raises
`CaptureError`, an `Unsupported`: its row says why, and no eager time stands in for the graph
time the spec asked for (beside graph-timed rows it would compare launch overhead with none).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..spec.sweep import Timing
from .providers.base import Unsupported

# One replay of the graph lasts about rep_ms / GRAPH_REPLAYS (the graph holds at most
# GRAPH_MAX_CALLS calls, so one of microsecond steps stays small); each replay is one sample, its
# time divided by its calls.
GRAPH_REPLAYS = 20
GRAPH_MAX_CALLS = 500
ESTIMATE_CALLS = 5  # calls that estimate the step's time, as do_bench and the interleaved timer


class CaptureError(Unsupported):
    """The step cannot be captured in a CUDA graph; the message gives the first error."""


def graph_calls(estimate_ms: float, timing: Timing) -> int:
    """Calls of the step in one graph: one replay lasts about rep_ms / GRAPH_REPLAYS; at least
    one call, at most GRAPH_MAX_CALLS."""
    per_replay = timing.rep_ms / GRAPH_REPLAYS
    return min(max(1, round(per_replay / max(estimate_ms, 1e-6))), GRAPH_MAX_CALLS)


def record_graph(graph, fn: Callable[[], object], calls: int) -> None:
    """Capture ``calls`` calls of ``fn`` into ``graph`` (a `torch.cuda.CUDAGraph`). The capture is
    always ended, so the stream leaves capture mode; on failure raises CaptureError with the first
    error (the step's own, such as a host sync, rather than the end of capture's "operation
    failed due to a previous error during capture")."""
    first: BaseException | None = None
    graph.capture_begin()
    try:
        _repeat(fn, calls)
    except Exception as exc:  # noqa: BLE001 - reported as the reason it cannot be captured
        first = exc
    try:
        graph.capture_end()
    except Exception as exc:  # noqa: BLE001
        first = first or exc
    if first is not None:
        text = str(first).strip().splitlines()
        raise CaptureError(f"cannot be captured in a CUDA graph (timing.cuda_graph): "
                           f"{type(first).__name__}: {text[0] if text else ''}") from first


def _clear_failed_capture(device: torch.device) -> None:
    # A capture that failed leaves torch's CUDA generators registered to it (torch 2.11: the next
    # torch.randn outside any capture raises "Offset increment outside graph capture encountered
    # unexpectedly", which would fail every later case); one capture that ends well clears them.
    graph, x = torch.cuda.CUDAGraph(), torch.zeros(1, device=device)
    with torch.cuda.stream(torch.cuda.Stream(device)):
        graph.capture_begin()
        x.add_(1)
        graph.capture_end()


def _repeat(fn: Callable[[], object], calls: int) -> None:
    for _ in range(calls):  # each output dropped before the next call, as a timed call's is
        fn()


def _elapsed(fn: Callable[[], object]) -> float:
    """Milliseconds of device time ``fn`` queues on the current stream, waited for."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def graph_samples(fn: Callable[[], object], timing: Timing, device: torch.device) -> list[float]:
    """Per-call milliseconds of ``fn`` from GRAPH_REPLAYS timed replays of a graph of it: the
    step is estimated over ESTIMATE_CALLS calls, captured `graph_calls` times over, replayed for
    about warmup_ms, then timed. Runs on the current stream (`timing.step_stream`), or on a side
    stream when that is the default one (no graph is captured there)."""
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device) if current == torch.cuda.default_stream(device) else current
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        estimate = _elapsed(lambda: _repeat(fn, ESTIMATE_CALLS)) / ESTIMATE_CALLS
        calls = graph_calls(estimate, timing)
        graph = torch.cuda.CUDAGraph()
        try:
            record_graph(graph, fn, calls)
        except CaptureError:
            _clear_failed_capture(device)
            raise
        replay_ms = _elapsed(graph.replay)  # the first replay, which uploads the graph, warms up
        for _ in range(min(math.ceil(timing.warmup_ms / max(replay_ms, 1e-6)), GRAPH_REPLAYS)):
            graph.replay()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(GRAPH_REPLAYS)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / calls for start, end in events]
