"""The Typer app: one command or sub-app per noun."""

from __future__ import annotations

import os
import sys

import typer


def _device_flag(argv: list[str]) -> str | None:
    """The value of --device on the command line, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _spec_wants_cpu(argv: list[str]) -> bool:
    """Whether a spec file named on the command line says `device: cpu`. Read here, ahead of the
    command, because the interpreter must be chosen before Triton loads; a spec that cannot be
    read is left to the command, which reports it."""
    import yaml

    for arg in argv:
        if not arg.endswith((".yaml", ".yml")) or not os.path.isfile(arg):
            continue
        try:
            with open(arg, encoding="utf-8") as handle:
                data = yaml.safe_load(handle)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and data.get("device") == "cpu":
            return True
    return False


def _use_interpreter_without_gpu(argv: list[str]) -> None:
    """Kernels run through Triton's interpreter on a CPU; the flag must precede their import. The
    CPU is asked for by --device cpu, or by a spec's `device: cpu` where --device is auto."""
    if os.environ.get("TRITON_INTERPRET"):  # set to something: the user's choice
        return
    flag = _device_flag(argv)
    wants_cpu = flag == "cpu" or (flag in (None, "auto") and _spec_wants_cpu(argv))
    import torch

    if wants_cpu or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_use_interpreter_without_gpu(sys.argv[1:])

from .commands.cache import cache_app  # noqa: E402
from .commands.errors import plain_path_errors, plain_warnings  # noqa: E402
from .commands.gate import gate  # noqa: E402
from .commands.merge import merge  # noqa: E402
from .commands.plot import plot, report  # noqa: E402
from .commands.env import env  # noqa: E402
from .commands.run import run, validate  # noqa: E402
from .commands.tune import tune  # noqa: E402

app = typer.Typer(name="dkbench", no_args_is_help=True, add_completion=False,
                  help="Benchmark and autotune block-sparse attention written in Triton.")
for _name, _command in (("run", run), ("validate", validate), ("env", env), ("tune", tune),
                        ("gate", gate), ("merge", merge), ("plot", plot), ("report", report)):
    app.command(_name)(plain_path_errors(_command))
app.add_typer(cache_app, name="cache", help="Show and manage the best-config cache.")
app.callback()(plain_warnings)
