"""A preparation that never ends stops the run with its error row written, not the run hung for
good (dkbench.measure.watchdog)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch

from dkbench.measure import runner, watchdog
from dkbench.results.schema import read_results
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand
from dkbench.tune.plan import plan_tune

from .specs import needs_interpreter, write_spec

ROOT = Path(__file__).resolve().parents[2]


def test_the_deadline_fires_while_the_body_runs() -> None:
    fired = threading.Event()
    with watchdog.deadline(0.05, fired.set):
        assert fired.wait(5)


def test_a_body_that_ends_in_time_is_never_reported() -> None:
    fired = threading.Event()
    with watchdog.deadline(0.2, fired.set):
        pass
    time.sleep(0.4)
    assert not fired.is_set()


def test_no_limit_starts_no_timer() -> None:
    before = threading.active_count()
    with watchdog.deadline(None, lambda: None):
        assert threading.active_count() == before


def test_only_a_gpu_run_gets_the_limit(tmp_path: Path) -> None:
    sweep = load_spec(write_spec(tmp_path))
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    ctx, _ = runner.begin_run(sweep, "", plan, torch.device("cpu"))
    assert ctx.prepare_limit_s is None and ctx.on_stuck is None
    assert watchdog.PREPARE_LIMIT_S == 3600.0


# The run in a process of its own: the deadline ends it. Its one provider never finishes preparing.
STUCK_RUN = textwrap.dedent("""
    import sys, time
    import torch
    from dkbench.measure import runner
    from dkbench.measure.providers.sdpa import SdpaMath
    from dkbench.spec.load import load_spec
    from dkbench.spec.sweep import expand

    SdpaMath.prepare = lambda self, *args, **kwargs: time.sleep(600)
    sweep = load_spec(sys.argv[1])
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, runner.Path(sys.argv[2]), None)
    ctx, work = runner.begin_run(sweep, "", plan, torch.device("cpu"))
    ctx.prepare_limit_s = 1.0
    runner.run_work(ctx, plan, work)
    print("the run went on", flush=True)
""")


def test_a_stuck_preparation_ends_the_run_with_its_row_and_resume_skips_it(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, seqlen=[32, 64])
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", STUCK_RUN, str(spec), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert time.perf_counter() - started < 120
    assert done.returncode == watchdog.STUCK_EXIT, done.stderr
    assert "the run went on" not in done.stdout
    (run_dir,) = (tmp_path / "out").iterdir()
    frame = read_results(run_dir)
    assert list(frame["provider"]) == ["sdpa_math"] and list(frame["seqlen"]) == [32]
    why = ("still preparing after 1 s (its compile, check and first call), taken for a call "
           "that never ends: the run stopped here, and --resume goes on without it")
    assert list(frame["status"]) == ["error"] and list(frame["message"]) == [why]
    message = " ".join(done.stderr.split())
    assert message.startswith(f"error: sdpa_math on case {frame['case_id'][0]}: {why}. ")
    assert f"finish the rest with `dkbench run --resume {run_dir}`" in message
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["stuck"] == {"case_id": frame["case_id"][0], "provider": "sdpa_math", "why": why}
    # The resume runs the other case only, its preparation ending this time.
    sweep = load_spec(spec)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", run_dir)
    rows = runner.execute(sweep, spec.read_text(), plan, torch.device("cpu"))
    assert [(r.seqlen, r.status) for r in rows] == [(64, "ok")]


# A tune in a process of its own: every candidate compiles, then the timing phase's first
# preparation never ends.
STUCK_TUNE = textwrap.dedent("""
    import itertools, sys, time
    from pathlib import Path
    import torch
    from dkbench.measure import watchdog
    from dkbench.measure.providers.bundled import BundledKernel
    from dkbench.spec.load import load_spec
    from dkbench.tune import tuner
    from dkbench.tune.plan import plan_tune

    watchdog.limit_for = lambda device: 1.0
    sweep = load_spec(sys.argv[1])
    cpu = torch.device("cpu")
    jobs = plan_tune(sweep, ("fwd",), cpu, {"block_m": (16, 32), "block_n": (32,),
                                             "num_warps": (4,), "num_stages": (1,)})
    compiled = sum(len(c.run) for job in jobs for c in job.candidates)
    real, calls = BundledKernel.prepare, itertools.count()

    def prepare(self, *args, **kwargs):
        if next(calls) >= compiled:
            time.sleep(600)
        return real(self, *args, **kwargs)

    BundledKernel.prepare = prepare
    tuner.execute_tune(sweep, "", jobs, cpu, Path(sys.argv[2]), Path(sys.argv[3]))
    print("the tune went on", flush=True)
""")


@needs_interpreter
def test_a_stuck_candidate_ends_the_tune_saying_where(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, mode="fwd")
    cache = tmp_path / "cache.json"
    done = subprocess.run([sys.executable, "-c", STUCK_TUNE, str(spec), str(tmp_path / "out"),
                           str(cache)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == watchdog.STUCK_EXIT, done.stderr
    assert "the tune went on" not in done.stdout
    (run_dir,) = (tmp_path / "out").iterdir()
    stuck = json.loads((run_dir / "meta.json").read_text())["stuck"]
    why = ("still preparing after 1 s (its compile, check and first call), taken for a call that "
           "never ends")
    # The timing phase starts with the default config: the one that hung.
    (job,) = plan_tune(load_spec(spec), ("fwd",), torch.device("cpu"), {
        "block_m": (16, 32), "block_n": (32,), "num_warps": (4,), "num_stages": (1,)})
    assert stuck == {"case_id": job.case.case_id, "candidate": job.candidates[0].default.short(),
                     "why": why}
    message = " ".join(done.stderr.split())
    assert message.startswith(f"error: candidate {stuck['candidate']} on case "
                              f"{stuck['case_id']}: {why}: the tune stopped here. ")
    assert f"The winners cached so far are in {cache}" in message
    assert message.endswith("leave that config out (--block-m, --block-n, ...) to tune the rest")
    assert not cache.exists()  # nothing was tuned before it
