"""Error types that carry a message meant for the person at the terminal.

Every error a user can cause by what they typed or by the files they pointed us at is a
:class:`CapsbenchError`. The CLI prints its message on one line and exits with code 2
(``--debug`` shows the traceback); anything else is a bug in capsbench.
"""

from __future__ import annotations


class CapsbenchError(Exception):
    """Base class: the message names the thing that is wrong and how to fix it."""


class DataError(CapsbenchError):
    """A data file or data root is missing, truncated or not what it claims to be.

    The message names the file, what was expected and what was found.
    """


class ConfigError(CapsbenchError):
    """An unknown name (model, suite, dataset, profile) or an invalid number."""


class TrainingError(CapsbenchError):
    """A training job failed for a reason the user should see (e.g. a NaN loss)."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message ("" for an empty one), cut to ``limit`` characters."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def describe(e: BaseException, limit: int | None = None) -> str:
    """``"TypeName: first line"`` of an exception, for a one-line error or an error row."""
    line = first_line(e, limit)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
