"""The Typer app: one command or sub-app per noun."""

from __future__ import annotations

import os
import sys

import typer


def _use_interpreter_without_gpu(argv: list[str]) -> None:
    """Kernels run through Triton's interpreter on a CPU; the flag must precede their import."""
    if os.environ.get("TRITON_INTERPRET"):  # set to something: the user's choice
        return
    wants_cpu = "--device=cpu" in argv or any(
        a == "--device" and i + 1 < len(argv) and argv[i + 1] == "cpu" for i, a in enumerate(argv))
    import torch

    if wants_cpu or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_use_interpreter_without_gpu(sys.argv[1:])

from .commands.cache import cache_app  # noqa: E402
from .commands.errors import plain_warnings  # noqa: E402
from .commands.gate import gate  # noqa: E402
from .commands.merge import merge  # noqa: E402
from .commands.plot import plot, report  # noqa: E402
from .commands.env import env  # noqa: E402
from .commands.run import run, validate  # noqa: E402
from .commands.tune import tune  # noqa: E402

app = typer.Typer(name="dkbench", no_args_is_help=True, add_completion=False,
                  help="Benchmark and autotune block-sparse attention written in Triton.")
app.command("run")(run)
app.command("validate")(validate)
app.command("env")(env)
app.command("tune")(tune)
app.command("gate")(gate)
app.command("merge")(merge)
app.command("plot")(plot)
app.command("report")(report)
app.add_typer(cache_app, name="cache", help="Show and manage the best-config cache.")
app.callback()(plain_warnings)
