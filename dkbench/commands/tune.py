"""`dkbench tune`: search launch configs of the bundled kernel and cache the fastest right one."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
import yaml
from rich import progress
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kernels import AXES, IMPLS, KERNELS

from ..errors import BadInputError, DkbenchError
from ..spec.sweep import Sweep
from ..tune.plan import CPU_SHAPE, GPU_SHAPE, MODE_KERNELS, TuneJob
from ..tune.rows import SCREENED
from ..tune.screen import (
    FINALISTS,
    SCREEN_MARGIN,
    SCREEN_ROUNDS,
    SCREEN_TURN_MS,
    Screen,
    screens,
)
from ..tune.space import CPU_SPACE, GPU_SPACES, TUNED
from .cache import cache_store, show_cache_warnings
from .errors import err_console, fail, path_flag

console = Console()

# Option help stays one or two lines at 80 columns; the explanations are the docstring's
# paragraphs, which rich wraps as prose.
_SHAPE_PANEL = "Single shape (instead of SPEC)"
_SPACE_PANEL = "Search space (each flag replaces one axis)"
_SCREEN_PANEL = "Screen (a brief timing of all, then the best in full)"


def prose_help(doc: str) -> str:
    """``doc`` with each paragraph, and each line that starts with "- ", on one line."""
    paragraphs = []
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        lines: list[str] = []
        for line in paragraph.splitlines():
            if lines and not line.startswith("- "):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.strip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _shape_option(key: str, what: str):
    """A single-shape flag; its help names the GPU and CPU defaults from tune_space."""
    return typer.Option(help=f"{what}. Default: {GPU_SHAPE[key]} GPU, {CPU_SHAPE[key]} CPU.",
                        show_default=False, rich_help_panel=_SHAPE_PANEL)


def _list_option(axis: str, example: str):
    """A search-space flag: comma-separated values for one config axis."""
    return typer.Option(help=f"{axis} values, comma-separated (e.g. {example}).",
                        show_default=False, rich_help_panel=_SPACE_PANEL)


def tune(
    spec: Annotated[Optional[Path], typer.Argument(
        parser=path_flag("SPEC", "a spec file (YAML), or no SPEC for one shape from the flags"),
        help="Sweep spec (YAML) to tune. Without it, one shape from the flags.",
        show_default=False)] = None,
    block_m: Annotated[Optional[str], _list_option("BLOCK_M", "32,64,128")] = None,
    block_n: Annotated[Optional[str], _list_option("BLOCK_N", "32,64")] = None,
    num_warps: Annotated[Optional[str], _list_option("num_warps", "4,8")] = None,
    num_stages: Annotated[Optional[str], _list_option("num_stages", "2,3,4")] = None,
    impl: Annotated[Optional[str], typer.Option(
        help=f"Implementations, comma-separated, of: {', '.join(IMPLS)}.",
        show_default=False,
        rich_help_panel=_SPACE_PANEL)] = None,
    mode: Annotated[Optional[str], typer.Option(
        help=f"{', '.join(MODE_KERNELS)} (see Modes). Default: the spec's, else fwd.",
        show_default=False)] = None,
    device: Annotated[str, typer.Option(
        help="auto, cuda or cpu (Triton's interpreter).")] = "auto",
    cache: Annotated[Optional[Path], typer.Option(
        parser=path_flag("--cache", "the cache file to write"),
        help="Cache file to write. Default: $DKBENCH_CACHE, else the platform cache dir.",
        show_default=False)] = None,
    top: Annotated[int, typer.Option(
        min=1, metavar="N", help="Candidates shown per case and kernel.")] = 5,
    no_screen: Annotated[bool, typer.Option(
        "--no-screen", help="Time every candidate in full: no screen first (see Screen).",
        rich_help_panel=_SCREEN_PANEL)] = False,
    finalists: Annotated[Optional[int], typer.Option(
        min=1, metavar="N", help="Candidates per kernel the screen keeps (and those near the "
                                 "best).", show_default=str(FINALISTS),
        rich_help_panel=_SCREEN_PANEL)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List candidates and pruned configs (with why); run nothing.")] = False,
    out: Annotated[Path, typer.Option(
        parser=path_flag("--out", "the directory that receives tune-NAME-TIME/ ('.' for this "
                                  "one)"),
        help="Directory that receives tune-NAME-TIME/.")] = Path("results"),
    seqlen: Annotated[Optional[int], _shape_option("seqlen", "Sequence length")] = None,
    heads: Annotated[Optional[int], _shape_option("heads", "Query heads")] = None,
    kv_heads: Annotated[Optional[int], _shape_option("kv_heads", "KV heads")] = None,
    head_dim: Annotated[Optional[int], _shape_option("head_dim", "Head dim")] = None,
    dtype: Annotated[Optional[str], _shape_option("dtype", "bf16/fp16/fp32")] = None,
    batch: Annotated[Optional[int], _shape_option("batch", "Batch size")] = None,
    block_size: Annotated[Optional[int], _shape_option("block_size", "Sparse block size")] = None,
    local_blocks: Annotated[Optional[int],
                            _shape_option("local_blocks", "Local blocks")] = None,
    vert_stride: Annotated[Optional[int],
                           _shape_option("vert_stride", "Vertical stride")] = None,
) -> None:
    """Search launch configs of the bundled kernel per case; cache the fastest one that is right.

    Every candidate is measured as `run` measures a provider: checked against the reference
    before it may win, and timed with the spec's timing.interleave (the default) together with
    the kernel's other candidates, in rounds against the default config. A config replaces the
    default only when it is faster in four rounds of five (timed one by one: beyond the p20-p80
    bands); the best median per-round speedup among those wins. Before anything is timed, every
    candidate of every case and kernel runs once to compile it, in one batch: on a GPU in worker
    processes, one per core (at most 8), so that the timing loop finds every kernel compiled.

    Screen: timed interleaved, a kernel with more than --finalists candidates besides the
    default first has all of them and the default timed together in {screen_rounds} rounds of
    {screen_turn} ms turns and ranked by median per-round speedup over the default (the default
    ranked with them, at 1.0). The candidates among the --finalists best, and every one within
    {screen_margin}% of the best (or of the default, where none beat it), go on to the full
    timing with the default, and only they may win; the others stay in tune.csv with their screen numbers and
    status screened. --no-screen times every candidate in full.

    Modes: fwd tunes the forward kernel; bwd the backward's dk/dv kernel, then its dq kernel
    behind the dk/dv winner (the forward's config from the lookup); fwd_bwd the forward first,
    then both backward kernels behind it. prefill_varlen tunes the varlen kernel and decode the
    decoding kernel, each on the spec's cases of that mode. Without --mode, the spec's training
    modes tune as one (fwd_bwd when they are several) and each inference mode as itself.

    Each search-space flag replaces one axis; the others keep the default space (impl gluon is
    the warp-specialised Hopper kernel of the forward, dk/dv and dq kernels; impl fused the
    backward's one-kernel dk/dv, which adds dq by atomics, so no dq kernel runs behind it). The
    default config is always timed too, as the reference. Default spaces:
    {default_spaces}

    Triton configs' block_n (and the dk/dv kernel's block_m) are capped at the block size; gluon
    runs on Hopper only.

    The single-shape flags build one causal local_stride case (local blocks, vertical stride)
    with head_sliding_offset 1.

    Winners go to the cache (on the CPU under the "cpu (triton interpreter)" key), every config
    to tune.csv in OUT/tune-NAME-TIME/. Both are checked writable before anything is timed.
    """
    from ..measure.runner import resolve_device
    from ..spec.load import load_spec
    from ..tune import tuner as tuning
    from ..tune.plan import check_tunable, plan_tune, resolve_modes, sweep_from_flags
    from ..tune.rows import TUNE_FILE
    from ..tune.space import parse_axis, parse_impl_list

    shape = {"seqlen": seqlen, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
             "dtype": dtype, "batch": batch, "block_size": block_size,
             "local_blocks": local_blocks, "vert_stride": vert_stride}
    lists = {"block_m": block_m, "block_n": block_n, "num_warps": num_warps,
             "num_stages": num_stages}
    try:
        if device not in ("auto", "cuda", "cpu"):
            raise BadInputError(f"--device {device!r}: allowed values are auto, cuda, cpu")
        if mode is not None and mode not in MODE_KERNELS:
            raise BadInputError(f"--mode {mode!r}: allowed values are {', '.join(MODE_KERNELS)}")
        overrides = {axis: parse_axis(axis, lists[axis])
                     if lists[axis] is not None else None for axis in AXES if axis in lists}
        overrides["impl"] = parse_impl_list(impl) if impl is not None else None
        dev = resolve_device(device)
        if spec is not None:
            given = [k for k, v in shape.items() if v is not None]
            if given:
                raise BadInputError(f"give a SPEC or shape flags, not both (got {spec} and "
                                    + ", ".join("--" + k.replace("_", "-") for k in given) + ")")
            sweep = load_spec(spec)
            if device == "auto" and sweep.device != "auto":
                dev = resolve_device(sweep.device, spec)
            spec_text = spec.read_text()
        else:
            sweep = sweep_from_flags(dev, mode or "fwd", **shape)
            spec_text = yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False)
        check_tunable(sweep, str(spec) if spec is not None else "shape flags")
        cache_store(cache)  # a cache path that can never be one is refused before any work
        ignored = _ignored_finalists(finalists, no_screen, sweep, spec)
        _check_interpreter(dev)
        modes = resolve_modes(sweep, mode)
        jobs = plan_tune(sweep, modes, dev, overrides)
        idle = _nothing_to_compare(jobs, lists, impl)
        if idle and not dry_run:
            raise BadInputError(idle)
    except DkbenchError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted while planning the tune; nothing was tuned.")
        raise typer.Exit(code=130) from None

    if ignored:
        err_console.print(f"[yellow]warning:[/yellow] {escape(ignored)}", highlight=False,
                          soft_wrap=True)
    screening = None if no_screen else Screen(
        finalists=FINALISTS if finalists is None else finalists)
    if dry_run:
        console.print(_dry_run_table(jobs, dev, sweep, screening))
        if idle:
            err_console.print(f"note: without --dry-run this tune is refused: {escape(idle)}",
                              highlight=False, soft_wrap=True)
        return
    console.print(f"Tuning {len(jobs)} case(s), mode {', '.join(modes)}, on {dev}"
                  + (" (Triton interpreter: timings exercise the pipeline only)"
                     if dev.type != "cuda" else ""))
    try:
        outcome = _execute(tuning, sweep, spec_text, jobs, dev, out, cache, screening)
    except DkbenchError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted: the rows of the kernels tuned so far are in the tune "
                          "directory, and their winners in the cache.")
        raise typer.Exit(code=130) from None
    try:
        for warning in outcome.warnings:
            err_console.print(f"warning: {escape(warning)}")
        for table in _top_tables(outcome, top):
            console.print(table)
        _print_cache(outcome, cache)
        console.print(f"Tune results: [bold]{escape(str(outcome.run_dir / TUNE_FILE))}[/bold]")
        if outcome.took:
            console.print(outcome.took, highlight=False)
    except KeyboardInterrupt:  # the tune is done: only its summary is cut short
        err_console.print(f"Interrupted while summing up; every row is in "
                          f"{outcome.run_dir / TUNE_FILE} and the winners in the cache.")
        raise typer.Exit(code=130) from None


def default_spaces_help() -> str:
    """The help's list of default spaces: each tunable kernel of the registry, then the CPU's."""
    def axes(values) -> str:
        return ", ".join(f"{axis} {{{','.join(map(str, values[axis]))}}}" for axis in AXES)
    items = [f"- {name} ({KERNELS[name].description}): {axes(GPU_SPACES[name])}"
             for name in TUNED]
    return "\n".join([*items, f"- CPU interpreter (every kernel): {axes(CPU_SPACE)}"])


# Typer keeps a docstring's single line breaks and rich wraps each source line again, which at
# 80 columns leaves a word or two dangling on every other line; one line per paragraph (and per
# "- " item) lets rich wrap the prose at the terminal's width instead. The default spaces are
# listed from the registry and tune_space, so a new tunable kernel appears in the help.
tune.__doc__ = prose_help(inspect.cleandoc(tune.__doc__ or "").replace(
    "{default_spaces}", default_spaces_help()).replace(
    "{screen_rounds}", str(SCREEN_ROUNDS)).replace("{screen_turn}", f"{SCREEN_TURN_MS:g}").replace(
    "{screen_margin}", f"{SCREEN_MARGIN * 100:g}"))


def _ignored_finalists(finalists: int | None, no_screen: bool, sweep: Sweep,
                       spec: Path | None) -> str | None:
    """Why a --finalists given does nothing here, or None: the screen that keeps the finalists
    is off (--no-screen), or never runs (the spec times one by one)."""
    if finalists is None:
        return None
    if no_screen:
        return f"--finalists {finalists} does nothing with --no-screen (no screen picks finalists)"
    if not sweep.timing.interleave:
        return (f"--finalists {finalists} does nothing: {spec or 'the spec'}: timing.interleave "
                "is false, and the screen runs only timed interleaved")
    return None


def _nothing_to_compare(jobs: list[TuneJob], lists: dict[str, str | None],
                        impl: str | None) -> str | None:
    """Why the search-space flags given leave nothing to time but the default, in every case and
    kernel (each config they give is the default or pruned), or None: such a tune would only time
    the default against itself, so the flags would do nothing."""
    given = [f"--{axis.replace('_', '-')} {text}" for axis, text in {**lists, "impl": impl}.items()
             if text is not None]
    if not given or any(len(c.run) > 1 for j in jobs for c in j.candidates):
        return None
    # A config's first reason only: a Gluon one on the CPU has five.
    reasons = list(dict.fromkeys(reason.split("; ")[0] for j in jobs for c in j.candidates
                                 for _, reason in c.pruned))
    why = f"each is pruned ({reasons[0]}{'; ...' if len(reasons) > 1 else ''})" if reasons \
        else "they give only the default config"
    return (f"{', '.join(given)}: no config to compare with the default in any case: {why}; "
            "--dry-run lists every config with why")


def _check_interpreter(dev: torch.device) -> None:
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BadInputError("--device cpu: the kernels need TRITON_INTERPRET=1 set before triton "
                            "is imported (the dkbench command sets it for --device cpu)")


def _execute(tuning, sweep, spec_text: str, jobs: list[TuneJob], dev: torch.device, out: Path,
             cache: Path | None, screen: Screen | None):
    # A bad cache file (ours, or the one the kernels' lookup reads) is named once, not per config.
    with show_cache_warnings(), _phase_bars(console) as on_progress:
        return tuning.execute_tune(sweep, spec_text, jobs, dev, out, cache, on_progress, screen)


_PHASES = {"compile": "compiling", "screen": "screening", "time": "measuring"}


@contextmanager
def _phase_bars(console: Console) -> Iterator:
    """``on_progress(phase, text, done, total)`` driving one rich bar per phase of the tune."""
    columns = (progress.TextColumn("{task.description}"), progress.BarColumn(),
               progress.MofNCompleteColumn(), progress.TimeElapsedColumn(),
               progress.TextColumn("eta"), progress.TimeRemainingColumn())
    with progress.Progress(*columns, console=console, transient=False) as shown:
        bars: dict[str, progress.TaskID] = {}

        def on_progress(phase: str, text: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = shown.add_task(_PHASES[phase], total=total)
            shown.update(bars[phase], description=f"{_PHASES[phase]}: {text}"[:90],
                         completed=done, total=total)

        yield on_progress


def _dry_run_table(jobs: list[TuneJob], dev: torch.device, sweep: Sweep,
                   screen: Screen | None) -> Table:
    table = Table(title=f"dry run on {dev}: candidates that would run, and pruned configs")
    for name in ("case", "kernel", "config", "would"):
        table.add_column(name, overflow="fold")
    for job in jobs:
        label = escape(f"{job.case.case_id} {job.case.label()}")
        for cands in job.candidates:
            for config in cands.run:
                what = "run (default, reference)" if config == cands.default else "run"
                table.add_row(label, cands.kernel, config.short(), what)
                label = ""  # the case once, on its first row
            for config, reason in cands.pruned:
                table.add_row(label, cands.kernel, config.short(),
                              f"[dim]pruned: {escape(reason)}[/dim]")
                label = ""
    n_run = sum(len(c.run) for j in jobs for c in j.candidates)
    n_pruned = sum(len(c.pruned) for j in jobs for c in j.candidates)
    table.caption = f"{n_run} to run, {n_pruned} pruned; nothing was compiled"
    n_screened = sum(screens(c, sweep, screen) for j in jobs for c in j.candidates)
    if n_screened:
        table.caption += (f"; {n_screened} kernel(s) screened: those among the best "
                          f"{screen.finalists} (the default ranked with them) and those within "
                          f"{screen.margin * 100:g}% of the best timed in full")
    return table


def _top_tables(outcome, top: int) -> list[Table]:
    tables = []
    for result in outcome.results:
        case = result.case
        table = Table(title=escape(f"{result.kernel}: {case.label()} ({case.case_id})"))
        for name, justify in (("#", "right"), ("config", "left"), ("ms", "right"),
                              ("p20-p80", "right"), ("vs default", "right")):
            table.add_column(name, justify=justify)
        for rank, row in enumerate(result.ranked()[:top], start=1):
            speedup = (f"{row.speedup_vs_default:.2f}x"
                       if row.speedup_vs_default == row.speedup_vs_default else "")
            name = row.config.short() + (" (default)" if row is result.default else "")
            spread = f"{row.ms_p20:.4f}-{row.ms_p80:.4f}"
            cells = [str(rank), name, f"{row.ms:.4f}", spread, speedup]
            if row.is_best:
                cells = [f"[bold green]{c}[/bold green]" for c in cells]
            table.add_row(*cells)
        failed = [r for r in result.rows if r.status not in ("ok", "unsupported", SCREENED)]
        pruned = [r for r in result.rows if r.status == "unsupported"]
        screened = [r for r in result.rows if r.status == SCREENED]
        notes = [f"{len(pruned)} pruned"] if pruned else []
        if screened:
            gains = [r.speedup_vs_default for r in screened if math.isfinite(r.speedup_vs_default)]
            notes.append(f"{len(screened)} screened out" + (
                f" (at most {max(gains):.2f}x the default in the screen)" if gains else ""))
        if failed:
            notes.append(f"{len(failed)} failed ({', '.join(sorted({r.status for r in failed}))})")
        if result.default_kept:
            notes.append("the default stays: no config was faster in four rounds of five "
                         "(or, timed one by one, beyond the p20-p80 bands)")
        if result.default.status != "ok":
            notes.append(f"default {result.default.config.short()} {result.default.status}: "
                         f"{result.default.message}")
        table.caption = escape("; ".join(notes)) if notes else None
        tables.append(table)
    return tables


def _print_cache(outcome, cache: Path | None) -> None:
    if not outcome.writes:
        console.print("No config ran ok: the cache was not written.")
        return
    for w in outcome.writes:
        console.print(f"cached {w.config.short()} for {escape(w.key.as_str())}")
    console.print(f"Cache: [bold]{escape(str(outcome.cache_path))}[/bold]")
    if cache is not None:
        from kernels import ENV_VAR, default_cache_path

        if Path(cache).expanduser() != default_cache_path():
            console.print(f"The kernels read ${ENV_VAR} (else the platform cache directory): "
                          f"set {ENV_VAR}={escape(str(outcome.cache_path))} for `dkbench run` "
                          "to use it.")
