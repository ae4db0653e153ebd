"""Every error the harness raises on purpose. The CLI maps each to a message and an exit code."""

from __future__ import annotations

# Printed when Ctrl-C arrives while the CLI is still starting (importing torch, spawning workers).
INTERRUPTED = "Interrupted while starting; nothing was run."


def one_line(err: BaseException) -> str:
    """An exception's message on one line, for quoting inside ours (pandas' parser ends its
    messages with a newline)."""
    return " ".join(str(err).split())


class DkbenchError(Exception):
    """Base of all harness errors; `exit_code` is what the CLI exits with."""

    exit_code = 2


class SpecError(DkbenchError):
    """A sweep spec is unreadable or invalid; the message names the file and the key path."""


class BadInputError(DkbenchError):
    """A flag, file or CSV given on the command line cannot be used."""


class CacheError(DkbenchError):
    """The best-config cache cannot be read or written."""


class NoWorkersLeft(DkbenchError):
    """Every GPU was dropped after repeated worker deaths while cases were still pending."""

    exit_code = 1


class RegressionError(DkbenchError):
    """The gate found a regression."""

    exit_code = 1


class ResultsWriteError(DkbenchError):
    """results.csv or meta.json could not be written (disk full, read-only); the message names the
    file, and the rows written before it are intact."""


class TornRowWarning(UserWarning):
    """A results.csv ended in a partial row (a run stopped mid-write); its bytes were set aside in a
    sibling file, named in the message, and the file cut back to its last whole row."""
