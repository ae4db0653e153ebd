"""`dkbench run` and `dkbench validate`."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.markup import escape

from .. import startup
from ..errors import INTERRUPTED, BadInputError, DkbenchError
from ..names import BUNDLED_PROVIDER
from ..results.schema import META_FILE, RESULTS_FILE, read_meta
from ..spec.load import load_spec
from ..spec.sweep import (
    excluded_for_provider,
    expand,
    filter_cases,
    graph_row_name,
    idle_config,
    idle_exclusions,
    only_mismatch,
    row_provider,
)
from .env import check_device_flag
from .errors import err_console, fail, path_flag
from .progress import progress_bar
from .resumed import (
    check_resume_out,
    check_resumed_environment,
    check_resumed_meta,
    check_resumed_results,
    check_resumed_rows,
    check_resumed_shard,
    recorded_flags,
    recorded_scope,
    run_ids,
)

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"
# Where an install from a wheel puts the built-in sweeps (pyproject's data-files).
INSTALLED_SWEEPS_DIR = Path(sys.prefix) / "share" / "dkbench" / "sweeps"
DEFAULT_OUT = Path("results")
# Held (flock) by the run writing a run directory; see `_lock`.
LOCK_FILE = ".dkbench.lock"

console = Console()


def default_spec(device: torch.device) -> Path:
    name = "phi3.yaml" if device.type == "cuda" else "smoke.yaml"
    for folder in (Path("sweeps"), SWEEPS_DIR, INSTALLED_SWEEPS_DIR):
        if (folder / name).is_file():
            return folder / name
    raise BadInputError(f"no SPEC given and the built-in default sweeps/{name} was not found "
                        f"(looked in ./sweeps, {SWEEPS_DIR} and {INSTALLED_SWEEPS_DIR})")


def run(
    spec: Annotated[Optional[Path], typer.Argument(
        parser=path_flag("SPEC", "a spec file (YAML), or no SPEC for the default"),
        help="Sweep spec (YAML). Default: sweeps/phi3.yaml on a GPU, sweeps/smoke.yaml on a CPU.",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        parser=path_flag("--out", "the directory that receives the run directory (default: "
                                  "results; '.' for this one)"),
        help="Directory that receives the run directory. Default: results. With --resume, the "
             "run writes into the directory it finishes.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu (cpu runs Triton's interpreter).")] = "auto",
    providers: Annotated[Optional[str], typer.Option(
        help="Comma-separated providers to run instead of the spec's.", show_default=False)] = None,
    only: Annotated[Optional[list[str]], typer.Option(
        help="Keep cases where KEY=VALUE (repeatable; VALUE may be a comma list).",
        show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(
        parser=path_flag("--resume", "the run directory to finish ('.' for this one)"),
        help="Finish an interrupted run directory instead of starting a new one. Without SPEC it "
             "runs the spec recorded in the run's meta.json (and its --providers, --only and "
             "--shard unless given); a SPEC that differs from the recorded one is refused.",
        show_default=False)] = None,
    gpus: Annotated[Optional[str], typer.Option(
        help="Spread the cases over GPUs of this host, one worker process each: 'all' or indices "
             "like 0,1,3. 'cpu:N' runs N CPU worker processes through Triton's interpreter "
             "(a testing/CI aid).", show_default=False)] = None,
    shard: Annotated[Optional[str], typer.Option(
        help="Run shard I of N (1-based, e.g. 2/4): the cases (after --only), largest first, "
             "dealt round-robin, so every machine given the same spec gets the same split. "
             "Combine the run directories with `dkbench merge`.", show_default=False)] = None,
    compile_ahead: Annotated[Optional[bool], typer.Option(
        "--compile-ahead/--no-compile-ahead",
        help=f"Before timing, compile the providers that compile ({BUNDLED_PROVIDER}, flex, fa4, "
             "...) for every pending case at once, in worker processes sharing the GPU; their "
             "caches on disk then serve the run's own set-up. Default: on, with one GPU (not with "
             "--gpus; Triton's interpreter on the CPU compiles nothing).",
        show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Run a sweep: every case x provider checked, timed and appended to results.csv."""
    with contextlib.ExitStack() as held:  # the run directory's lock, released however it ends
        _run(spec, out, device, providers, only, resume, gpus, shard, compile_ahead, quiet, held)


def _run(spec: Path | None, out: Path | None, device: str, providers: str | None,
         only: list[str] | None, resume: Path | None, gpus: str | None, shard: str | None,
         compile_ahead: bool | None, quiet: bool, held: contextlib.ExitStack) -> None:
    plan, scope = None, {}
    try:
        from ..measure import runner
        from ..measure.parallel import execute_parallel, parent_device, parse_gpus
        from ..measure.resume import recorded_spec
        from ..measure.shard import parse_shard, shard_cases
        from ..report.summary import cannot_run_here, outcome_line, setup_line, summary_table

        check_device_flag(device)
        if resume is not None:
            check_resume_out(resume, out)
            check_resumed_meta(resume)
        elif out is not None:
            _check_out_not_a_run(out)
        sweep = None
        if resume is not None and spec is None:
            sweep, spec_text = recorded_spec(resume)
            providers, only, shard = recorded_flags(resume, providers, only, shard)
        part = parse_shard(shard) if shard is not None else None
        slots = parse_gpus(gpus) if gpus is not None else None
        dev = parent_device(slots) if slots else runner.resolve_device(device)
        if sweep is None:
            if spec is None:
                spec = default_spec(dev)
                how = "GPU" if dev.type == "cuda" else "CPU, through Triton interpreter"
                console.print(f"No SPEC given: running the built-in default [bold]{spec}[/bold] "
                              f"({how}).")
            sweep = load_spec(spec)
            spec_text = spec.read_text()
        if slots:
            _check_workers_device(gpus, slots[0].cuda, device if device != "auto" else sweep.device)
            dev = parent_device(slots)
            if compile_ahead:
                raise BadInputError(f"--compile-ahead runs on one GPU; with --gpus {gpus} each "
                                    "worker compiles as it goes (drop one of the two)")
        elif device == "auto" and sweep.device != "auto":
            dev = runner.resolve_device(sweep.device, spec or resume / META_FILE)
        chosen = _chosen_providers(sweep.providers, providers)
        everything = expand(sweep)
        cases = filter_cases(everything, only or [])
        if not cases:
            raise BadInputError(f"--only {' '.join(only or [])}: no case of "
                                f"{spec or resume / META_FILE} matches"
                                f"{only_mismatch(everything, only or [])}")
        spec_cases, cases = len(cases), shard_cases(cases, part)
        if not cases:
            console.print(f"Shard {part} has no cases (the sweep has {spec_cases}); "
                          "nothing to run.")
            return
        if resume is not None:
            check_resumed_shard(resume, part)
            check_resumed_results(resume)  # before plan_run reads its rows
        if resume is not None and resume.is_dir() and os.access(resume, os.W_OK | os.X_OK):
            _lock(resume, held)  # before its rows are read: another run may be adding to them
        plan = runner.plan_run(sweep, cases, chosen, out or DEFAULT_OUT, resume)
        if resume is None:
            _lock(plan.run_dir, held)
        if resume is not None:  # after plan_run, which sets a torn last row aside with a note
            from ..measure.envinfo import environment

            here = environment(dev)
            if slots and not slots[0].cuda:  # CPU workers interpret, whatever this process does
                here["gpu"] = "cpu (triton interpreter)"
            check_resumed_environment(resume, here)
            check_resumed_rows(resume, {c.case_id for c in everything},
                               spec or resume / META_FILE)
            scope = recorded_scope(resume, chosen, only)
            baseline = sweep.baseline if sweep.baseline in chosen else None
            if read_meta(resume).get("finished") and not runner.pending_work(sweep, plan,
                                                                             baseline):
                # Finished, every row there: running it again would only overwrite the times and
                # environment its meta.json records (and calibrate a GPU for nothing).
                console.print(f"Nothing left to run: {resume} already holds every row of its "
                              f"{len(cases)} cases x {len(chosen)} providers (finished "
                              f"{read_meta(resume)['finished']}).", highlight=False)
                return
        _announce(plan, sweep, cases, part, spec_cases, chosen, slots, dev, compile_ahead)
    except DkbenchError as exc:
        _drop_unstarted(plan, resume)
        raise fail(exc) from None
    except KeyboardInterrupt:
        _drop_unstarted(plan, resume)
        err_console.print(INTERRUPTED)
        raise typer.Exit(code=130) from None
    meta = {"shard": str(part) if part else None, "only": list(only or []), "gpus": gpus,
            **scope}
    if resume is not None:  # a finished run resumed (more providers) is unfinished until it ends
        meta["finished"] = None
        meta["run_ids"] = run_ids(resume)  # its old rows' and the new ones' (check_resumed_rows)

    def run_sweep(on_progress=None):
        if slots:
            return execute_parallel(sweep, spec_text, plan, slots, on_progress, _warn,
                                    extra_meta=meta)
        if compile_ahead is not False:
            from ..measure import ahead

            return ahead.execute(sweep, spec_text, plan, dev, on_progress, extra_meta=meta)
        return runner.execute(sweep, spec_text, plan, dev, on_progress, extra_meta=meta)

    started, startup_s = time.perf_counter(), startup.seconds()
    try:
        if quiet:
            rows = run_sweep()
        else:
            with progress_bar(console) as on_progress:
                rows = run_sweep(on_progress)
    except KeyboardInterrupt:
        err_console.print(f"Interrupted. Rows so far are in {plan.run_dir}; finish with "
                          f"--resume {plan.run_dir}")
        raise typer.Exit(code=130) from None
    except DkbenchError as exc:
        err_console.print(f"Rows so far are in {plan.run_dir}; finish with --resume {plan.run_dir}")
        raise fail(exc) from None
    try:
        if not quiet and rows:
            console.print(summary_table(rows, sweep.baseline))
            if rows[0].interpreter:
                console.print("Timings above ran through Triton's interpreter on the CPU: they "
                              "check the pipeline and say nothing about GPU performance.")
        compiled_ahead = read_meta(plan.run_dir).get("compiled_ahead")
        if compile_ahead and dev.type == "cuda" and compiled_ahead is None:
            _warn("--compile-ahead: fewer than two providers and modes compile in this run, so "
                  "none was compiled ahead (one worker would only add its start-up)")
        outcome = outcome_line(rows, cannot_run_here(rows, dev))
        if outcome:
            console.print(outcome)
        spent = setup_line(rows, time.perf_counter() - started, ahead=compiled_ahead,
                           startup_s=startup_s)
        if spent and not quiet:
            console.print(spent, highlight=False)
    except KeyboardInterrupt:  # every row is written by now: only the summary is cut short
        err_console.print(f"Interrupted while summing up; every row is in {plan.run_dir}")
        raise typer.Exit(code=130) from None
    console.print(f"Results: [bold]{escape(str(plan.run_dir / 'results.csv'))}[/bold]")


def _warn(text: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {escape(text)}", highlight=False)


def _announce(plan, sweep, cases, part, spec_cases, chosen, slots, dev, compile_ahead) -> None:
    """The run directory and what runs where, then every warning before the first row."""
    count = (f"{len(cases)} cases" if part is None
             else f"shard {part}: {len(cases)} of {spec_cases} cases")
    where = (f"{len(slots)} worker{'s' * (len(slots) > 1)} ({', '.join(s.label for s in slots)})"
             if slots else str(dev))
    both = ""
    if sweep.timing.graph_rows:
        both = (", each timed eagerly and by CUDA-graph replay" if dev.type == "cuda"
                else ", each in a NAME and a NAME+graph row")
    console.print(f"Run directory: [bold]{escape(str(plan.run_dir))}[/bold] ({count} x "
                  f"{len(chosen)} providers{both} on {where})")
    for note in [*plan.warnings, *idle_exclusions(sweep, chosen), *idle_config(sweep, chosen)]:
        _warn(note)
    if dev.type == "cpu":
        from ..measure.envinfo import TRITON_PROVIDERS, interpreting
        from ..measure.size_guard import cpu_warning
        from ..measure.timing import WALLCLOCK

        if compile_ahead:
            _warn("--compile-ahead: Triton's interpreter on the CPU compiles nothing; the run "
                  "goes on without that phase")
        if sweep.timing.cuda_graph:  # true, or [false, true]
            _warn("timing.cuda_graph: the CPU has no CUDA graphs, so every row is timed by the "
                  f"wall clock (timer {WALLCLOCK}), the NAME+graph rows too")
        triton = [p for p in chosen if p in TRITON_PROVIDERS]
        if triton and not slots and not interpreting():
            _warn(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} turns Triton's "
                  f"interpreter off, so {', '.join(triton)} cannot run on the CPU and its rows "
                  "will be errors; unset it (or set TRITON_INTERPRET=1) to run them")
        slow = cpu_warning(cases, chosen)
        if slow:
            _warn(slow)
    # A cache file that cannot be read is set aside once, here, with one warning naming it.
    from kernels import ConfigCache

    from .cache import show_cache_warnings

    with show_cache_warnings():
        ConfigCache().entries()


def _lock(run_dir: Path, held: contextlib.ExitStack) -> None:
    """Hold ``run_dir``'s lock until this run ends: two runs writing one directory at once (a
    --resume started while the run, or another resume, still goes) would both measure its missing
    rows and append each of them twice."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no advisory locks to take
        return
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    except OSError as exc:
        raise BadInputError(f"{run_dir}: cannot make its lock file {LOCK_FILE} there "
                            f"({exc.strerror or exc})") from None
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BadInputError(f"--resume {run_dir}: another dkbench run is writing to it now (it "
                            f"holds {path}); let that one end, or stop it, then resume") from None


def _check_out_not_a_run(out: Path) -> None:
    """Refuse an --out that is a run directory, or inside one: the new run would hide in it
    (merge, plot and report read a run's own files, not runs nested in it)."""
    probe = Path(out)
    while True:
        if any((probe / name).is_file() for name in (META_FILE, RESULTS_FILE)):
            inside = "" if probe == Path(out) else f" is inside the run directory {probe}, which"
            raise BadInputError(f"--out {out}:{inside or ''} holds a run ({META_FILE} or "
                                f"{RESULTS_FILE}); --out takes the directory that receives run "
                                f"directories: give --resume {probe} to finish that run, or an "
                                f"--out outside it (e.g. {probe.parent}) for a new one")
        if probe.exists() or probe.parent == probe:
            return  # runs are looked for up to the nearest existing directory only
        probe = probe.parent


def _drop_unstarted(plan, resume: Path | None) -> None:
    """A new run directory left empty by an error or Ctrl-C before its first row is removed."""
    if plan is not None and resume is None:
        try:
            if len(os.listdir(plan.run_dir)) == 1:  # its lock file alone
                (plan.run_dir / LOCK_FILE).unlink(missing_ok=True)
            plan.run_dir.rmdir()  # only when empty
        except OSError:
            pass


def _chosen_providers(spec_providers: list[str], flag: str | None) -> list[str]:
    """The spec's providers, or those of --providers: known names, each once."""
    if flag is None:
        return list(spec_providers)
    from ..measure.providers import PROVIDERS

    chosen = [p.strip() for p in flag.split(",") if p.strip()]
    if not chosen:
        raise BadInputError(f"--providers {flag!r}: name at least one provider; "
                            f"allowed: {', '.join(PROVIDERS)}")
    unknown = [p for p in chosen if p not in PROVIDERS]
    if unknown:
        graphs = [p for p in unknown if row_provider(p)[1] and row_provider(p)[0] in PROVIDERS]
        hint = (f" ({', '.join(graphs)}: CUDA-graph rows come from the spec's "
                "timing.cuda_graph: [false, true], beside the provider's eager ones; name "
                "the provider)" if graphs else "")
        raise BadInputError(f"--providers: unknown {', '.join(unknown)}; allowed: "
                            f"{', '.join(PROVIDERS)}{hint}")
    twice = sorted({p for p in chosen if chosen.count(p) > 1})
    if twice:  # each would measure the case again, into a second row of the same key
        raise BadInputError(f"--providers {flag!r}: {', '.join(twice)} given twice; name each "
                            "provider once")
    return chosen


def _check_workers_device(gpus: str, cuda: bool, asked: str) -> None:
    want = "cuda" if cuda else "cpu"
    if asked not in ("auto", want):
        raise BadInputError(f"--gpus {gpus} runs on {want}, but the device asked for (--device or "
                            f"the spec's device) is {asked}")


def validate(spec: Annotated[Path, typer.Argument(
        help="Sweep spec (YAML) to check.",
        parser=path_flag("SPEC", "a spec file (YAML)"))]) -> None:
    """Check a spec and print how many cases it expands to."""
    try:
        sweep = load_spec(spec)
    except DkbenchError as exc:
        raise fail(exc) from None
    cases = expand(sweep)
    names = list(sweep.providers)
    if sweep.timing.graph_rows:  # every provider's CUDA-graph rows beside its eager ones
        names += [graph_row_name(name) for name in sweep.providers]
    rows = sum(not excluded_for_provider(sweep, case, p) for case in cases for p in names)
    timed = " (each timed eagerly and by CUDA-graph replay)" if sweep.timing.graph_rows else ""
    console.print(f"{escape(str(spec))}: ok, {len(cases)} cases x {len(sweep.providers)} providers"
                  f"{timed} = {rows} rows (after exclusions)", highlight=False)
    for note in [*idle_exclusions(sweep), *idle_config(sweep)]:
        _warn(note)
