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

from .specs import write_spec

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
