"""`dkbench cache ...`: inspect and manage the best-config cache."""

from __future__ import annotations

import errno
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kernels import (
    ENV_VAR,
    KERNELS,
    OWNED_STEP_BOXES,
    ConfigCache,
    LaunchConfig,
    config_problems,
    read_entries,
)

from ..errors import CacheError
from ..tune.cache import CacheRow, cache_errors, cache_rows, cache_warnings
from .errors import cli_errors, fail, plain_path_errors

cache_app = typer.Typer(
    help="Inspect and manage the best-config cache that the bundled kernels read at launch.",
    no_args_is_help=True,
)

console = Console()
err_console = Console(stderr=True)

CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        help=f"Cache file to use (overrides ${ENV_VAR} and the platform cache directory).",
        dir_okay=False,
    ),
]


def _say(text: str) -> None:
    """One line on stdout, never folded: a long path must stay whole to be copied."""
    console.print(escape(text), highlight=False, soft_wrap=True)


def _warn(text: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {escape(text)}", highlight=False,
                      soft_wrap=True)


@contextmanager
def show_cache_warnings() -> Iterator[None]:
    """A cache file set aside or ignored inside the block is named once, on stderr."""
    with cache_warnings(_warn):
        yield


@contextmanager
def _cli_errors() -> Iterator[None]:
    """Cache library errors become harness errors, reported like every other command's; a bad
    cache file that was set aside is named once on stderr."""
    with cli_errors(), cache_errors(), show_cache_warnings():
        yield


def cache_store(cache: Path | None) -> ConfigCache:
    """The cache at ``cache`` (else $DKBENCH_CACHE, else the platform's), refused when it names
    what can never be a cache file: lookups would only warn and read it as empty."""
    allowed = "allowed: a regular file, or a path where one can be made"
    try:
        store = ConfigCache(cache)
    except RuntimeError:  # expanduser() of ~name where no user is called name
        given = cache if cache is not None else os.environ.get(ENV_VAR)
        raise fail(CacheError(f"cannot use the config cache {given}: its ~ names no user "
                              f"here; {allowed}")) from None
    try:
        mode = os.stat(store.path).st_mode
    except FileNotFoundError:
        return store  # made by the first write
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise  # plain_path_errors says what the limits are
        why = exc.strerror
        if exc.errno == errno.ENOTDIR:  # the nearest part of the path that exists is a file
            why = f"{next(p for p in store.path.parents if os.path.lexists(p))} is not a directory"
        raise fail(CacheError(f"cannot use the config cache {store.path}: {why}; {allowed}")
                   ) from None
    if stat.S_ISDIR(mode):
        raise fail(CacheError(f"{store.path} is a directory, not a cache file; name a file, "
                              f"such as {store.path / 'cache.json'}"))
    if not stat.S_ISREG(mode):
        raise fail(CacheError(f"{store.path} is not a regular file (a device, a fifo or a "
                              f"socket), so not a cache file; {allowed}"))
    return store


def _check_usable(src: Path) -> None:
    """Refuse an import file with an entry that no launch would use, which a lookup skips without
    a word: of a kernel this version does not have, or with a config its kernel cannot run. The
    file is read by the reader the import uses: a bad one raises as the import would (a missing
    one is left to the import to name)."""
    _, entries = read_entries(src)
    for name, entry in entries.items():
        key = entry["key"]
        if key["kernel"] not in KERNELS:
            raise CacheError(f"{src}: entry {name!r}: key['kernel'] must be one of "
                             f"{', '.join(KERNELS)}, got {key['kernel']!r}")
        if key["steps"] != "union" and key["kernel"] not in OWNED_STEP_BOXES:
            raise CacheError(f"{src}: entry {name!r}: key['steps'] is {key['steps']!r}, but "
                             f"only {', '.join(OWNED_STEP_BOXES)} have that form; a "
                             f"{key['kernel']} key's is 'union'")
        problems = config_problems(LaunchConfig.from_dict(entry["config"]), key["block_size"],
                                   key["head_dim"], key["kernel"])
        if problems:
            raise CacheError(f"{src}: entry {name!r}: its config cannot run: "
                             f"{'; '.join(problems)}")


def _cell(text: str) -> str:
    """``text`` from the cache file as a table cell: rich markup escaped, and characters that are
    not printable (a terminal escape, a newline, a lone surrogate a JSON ``\\ud800`` makes, which
    stdout cannot encode) written as Python escapes."""
    printable = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                        for c in text)
    return escape(printable)


def _entries(n: int) -> str:
    return "1 entry" if n == 1 else f"{n} entries"


def _import_summary(counts: Any) -> str:  # kernels' ImportCounts
    """What an import did, beyond the count: entries it replaced, found as they were, or kept;
    none of them passes without a word."""
    parts = [f"{counts.added} new"] if counts.added else []
    if counts.replaced:
        parts.append(f"{counts.replaced} replaced what was cached")
    if counts.unchanged:
        parts.append(f"{counts.unchanged} already cached as in the file")
    if counts.kept:
        parts.append(f"{counts.kept} cached differently, kept as --keep-existing asks")
    return f" ({'; '.join(parts)})" if parts else ""


def _ms(value: float) -> str:
    """A time as a table cell: one a hand edit made huge (1e308 ms) in 9 characters, not 300."""
    return f"{value:.4f}" if value < 1e6 else f"{value:.3e}"


def _machine_tables(rows: list[CacheRow]) -> list[Table]:
    """One table per (GPU, capability, triton): the machine in the title, so that the rest fits
    80 columns; the shape fields share one cell that wraps at spaces, never inside a field."""
    tables = []
    for (gpu, capability, triton), group in groupby(
            rows, key=lambda r: (r.key.gpu, r.key.capability, r.key.triton)):
        cc = [f"cc {capability}"] if capability else []  # none for the CPU interpreter
        machine = ", ".join([gpu, *cc, f"triton {triton}"])
        table = Table(title=_cell(machine), title_justify="left", box=box.SIMPLE_HEAD,
                      padding=(0, 1), collapse_padding=True, pad_edge=False)
        for name in ("kernel", "hash", "dtype"):
            table.add_column(name, no_wrap=True)
        table.add_column("shape")
        table.add_column("config", min_width=11)  # "64x32 w4 s3" on one line
        for name in ("ms", "default", "speedup"):
            table.add_column(name, justify="right", no_wrap=True)
        for r in group:
            k = r.key
            shape = f"d{k.head_dim} bs{k.block_size} s{k.seqlen_bucket} p{k.density_bucket:.2f}"
            shape += "" if k.steps == "union" else f" {k.steps}"  # a pattern of owned steps
            table.add_row(_cell(k.kernel), _cell(k.kernel_hash), _cell(k.dtype), shape,
                          _cell(r.config), _ms(r.ms),
                          "failed" if math.isnan(r.default_ms) else _ms(r.default_ms),
                          # inf where a time near 0 overflowed the division
                          f"{r.speedup:.2f}x" if math.isfinite(r.speedup) else "-")
        tables.append(table)
    return tables


@cache_app.command()
@plain_path_errors
def show(cache: CacheOption = None) -> None:
    """Show every cached config with its timing against the default config, one table per
    machine (GPU, compute capability, triton version)."""
    with _cli_errors():
        store = cache_store(cache)
        rows = cache_rows(store.entries())
    if not rows:
        _say(f"no entries in {store.path}")
        return
    _say(f"{_entries(len(rows))} in {store.path}")
    for table in _machine_tables(rows):
        console.print(table)
    console.print("shape: head_dim d, block size bs, seqlen bucket s, density bucket p; "
                  "default: ms of the default config", style="dim", highlight=False)


@cache_app.command()
@plain_path_errors
def path(cache: CacheOption = None) -> None:
    """Print the cache file in use (it need not exist yet)."""
    # Plain echo, not rich: scripts read this line and it must never wrap.
    typer.echo(str(cache_store(cache).path))


@cache_app.command()
@plain_path_errors
def clear(
    cache: CacheOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove every entry from the cache."""
    with _cli_errors():
        store = cache_store(cache)
        store.check_usable()  # a file that is not a cache is refused, not read as empty
        n = len(store.entries())
    if n == 0:
        _say(f"no entries in {store.path}")
        return
    if not yes:
        typer.confirm(f"Remove {'the only entry' if n == 1 else f'all {n} entries'} from "
                      f"{store.path}?", abort=True)
    with _cli_errors():
        removed = store.clear()
    _say(f"removed {_entries(removed)} from {store.path}")


@cache_app.command("export")
@plain_path_errors
def export_(
    file: Annotated[Path, typer.Argument(help="Where to write the entries.", dir_okay=False)],
    cache: CacheOption = None,
) -> None:
    """Write the cache's entries to FILE, in the cache format (FILE is replaced whole; it may
    not be the cache itself or its lock file)."""
    with _cli_errors():
        n = cache_store(cache).export(file)
    _say(f"exported {_entries(n)} to {file}")


@cache_app.command("import")
@plain_path_errors
def import_(
    file: Annotated[Path, typer.Argument(help="A file written by `dkbench cache export`.")],
    cache: CacheOption = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite/--keep-existing", help="Replace entries already cached."),
    ] = True,
) -> None:
    """Merge the entries of FILE into the cache, saying how many were new, replaced a cached
    entry, were cached already as they are, or were kept as cached (--keep-existing)."""
    with _cli_errors():
        store = cache_store(cache)
        _check_usable(file)
        counts = store.merge(file, overwrite=overwrite)
    _say(f"imported {_entries(counts.written)} into {store.path}{_import_summary(counts)}")
