"""The errors users see: one line that names the thing (and the step) and the fix.

`QggufError` is a failure qgguf understands (bad input, a missing build); the CLI prints its message. Anything
else that escapes a command (disk full, out of memory, a torch or transformers error) is reported by the CLI in
one line naming the step that was running and the cause, with the traceback written to a file."""

from __future__ import annotations

import contextlib
from typing import Iterator

_steps: list[str] = []
_failed_in: list[str] = []  # the steps that were running when the last exception left them


class QggufError(Exception):
    """A user-facing failure. The CLI prints its message (no traceback) and exits non-zero."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Name the step the code inside is part of, for the CLI's one-line report of an unexpected failure."""
    if not _steps:
        _failed_in.clear()  # a new outermost step: forget an earlier, handled failure
    _steps.append(name)
    try:
        yield
    except BaseException:
        if len(_steps) > len(_failed_in):  # the innermost step records it; the outer ones keep its record
            _failed_in[:] = _steps
        raise
    finally:
        _steps.pop()


def failed_step() -> str | None:
    """The step (with the steps around it) in which the exception being handled was raised, if any."""
    return " > ".join(_failed_in) if _failed_in else None


def run_tool(main, name: str) -> None:
    """A tool's entry point (tools/*.py): exit with main()'s status; a QggufError is one line naming the tool."""
    import sys

    try:
        sys.exit(main())
    except QggufError as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(1)
