"""`dkbench cache ...`: inspect and manage the best-config cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dkbench.cache import cache_errors, cache_rows
from kernels.config_cache import ENV_VAR, ConfigCache

from .errors import cli_errors

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


@contextmanager
def _cli_errors() -> Iterator[None]:
    """Cache library errors become harness errors, reported like every other command's."""
    with cli_errors(), cache_errors():
        yield


@cache_app.command()
def show(cache: CacheOption = None) -> None:
    """Show every cached config with its timing against the default config."""
    with _cli_errors():
        store = ConfigCache(cache)
        rows = cache_rows(store.entries())
    if not rows:
        console.print(f"no entries in {escape(str(store.path))}")
        return
    table = Table(title=escape(str(store.path)))
    for name in ("gpu", "cc", "triton", "kernel", "hash", "dtype", "head_dim", "block",
                 "seqlen", "density", "config"):
        table.add_column(name)
    for name in ("ms", "default_ms", "speedup"):
        table.add_column(name, justify="right")
    for r in rows:
        k = r.key
        table.add_row(
            escape(k.gpu), k.capability, k.triton, k.kernel, k.kernel_hash, k.dtype,
            str(k.head_dim), str(k.block_size), str(k.seqlen_bucket), f"{k.density_bucket:.2f}",
            r.config, f"{r.ms:.4f}", f"{r.default_ms:.4f}", f"{r.speedup:.2f}x",
        )
    console.print(table)


@cache_app.command()
def path(cache: CacheOption = None) -> None:
    """Print the cache file in use (it need not exist yet)."""
    # Plain echo, not rich: scripts read this line and it must never wrap.
    typer.echo(str(ConfigCache(cache).path))


@cache_app.command()
def clear(
    cache: CacheOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove every entry from the cache."""
    with _cli_errors():
        store = ConfigCache(cache)
        n = len(store.entries())
    if n == 0:
        console.print(f"no entries in {escape(str(store.path))}")
        return
    if not yes:
        typer.confirm(f"Remove all {n} entries from {store.path}?", abort=True)
    with _cli_errors():
        removed = store.clear()
    console.print(f"removed {removed} entries from {escape(str(store.path))}")


@cache_app.command("export")
def export_(
    file: Annotated[Path, typer.Argument(help="Where to write the entries.", dir_okay=False)],
    cache: CacheOption = None,
) -> None:
    """Write the cache's entries to FILE, in the cache format."""
    with _cli_errors():
        n = ConfigCache(cache).export(file)
    console.print(f"exported {n} entries to {escape(str(file))}")


@cache_app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="A file written by `dkbench cache export`.")],
    cache: CacheOption = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite/--keep-existing", help="Replace entries already cached."),
    ] = True,
) -> None:
    """Merge the entries of FILE into the cache."""
    with _cli_errors():
        store = ConfigCache(cache)
        n = store.import_(file, overwrite=overwrite)
    console.print(f"imported {n} entries into {escape(str(store.path))}")
