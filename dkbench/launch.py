"""The console script's entry: the Typer app, imported inside a guard because importing torch
and the kernels takes seconds, and a Ctrl-C then must end in one line, not a traceback."""

from __future__ import annotations

import signal
import sys
from typing import Any

from .errors import INTERRUPTED


def stop_on_sigterm_as_on_ctrl_c() -> None:
    """SIGTERM (`kill`, a job scheduler's stop) ends a command as Ctrl-C does: the rows written
    so far kept, the way to finish them printed, exit 130. Left alone where someone set it."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def repeated_flag(command: Any, argv: list[str]) -> str | None:
    """Why ``argv`` (the words after ``command``'s name) gives an option of one value twice with
    different values, or None: the parser would keep the last and drop the others in silence."""
    by_name = {name: param for param in command.params if getattr(param, "opts", None)
               for name in (*param.opts, *param.secondary_opts) if name.startswith("-")}
    seen: dict[str, tuple[str, str]] = {}  # option -> (as first given, its value)
    words = iter(argv)
    for word in words:
        if word == "--":
            break
        name, eq, value = word.partition("=")
        param = by_name.get(name)
        if param is None or param.multiple or getattr(param, "count", False):
            continue
        if param.is_flag:  # -q and --quiet say the same; --x and --no-x do not
            value = "off" if name in param.secondary_opts else "on"
            shown = word
        else:
            value = value if eq else next(words, "")
            shown = f"{name} {value!r}"
        first, before = seen.setdefault(param.name, (shown, value))
        if before != value:
            return (f"{first} and {shown}: {param.opts[0]} takes one value, and only the "
                    "last would count; give it once")
    return None


def _refuse_repeated_flags(app: Any, argv: list[str]) -> None:
    import typer.main

    from .commands.errors import fail
    from .errors import BadInputError

    # Down to the command the words name: `cache show` is the command show of the group cache.
    command: Any = typer.main.get_command(app)
    while argv and argv[0] in getattr(command, "commands", {}):
        command, argv = command.commands[argv[0]], argv[1:]
    reason = None if hasattr(command, "commands") else repeated_flag(command, argv)
    if reason is not None:
        raise SystemExit(fail(BadInputError(reason)).exit_code)


def main() -> None:
    from . import startup

    startup.mark()  # the summaries count the seconds from here to the work as start-up
    stop_on_sigterm_as_on_ctrl_c()
    try:
        from .cli import app
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None
    _refuse_repeated_flags(app, sys.argv[1:])
    app()
