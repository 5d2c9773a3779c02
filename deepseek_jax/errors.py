"""Errors a user can cause, and how every command reports them.

A `UserError` is a mistake in the user's input or environment (a bad flag, a missing
checkpoint, a mesh that does not divide): its message is one line naming the value and the
fix. Commands run their `main` under `report_errors`, which prints that line on stderr and
exits with status 2; `--debug` on the command line or `DEEPSEEK_JAX_DEBUG=1` shows the
traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable


class UserError(ValueError):
    """A mistake the user can fix; the message names the bad value and the fix.

    `exit_now`: end the process at once after reporting (os._exit), skipping the interpreter's
    teardown, which background threads left failing (a failed checkpoint save's writers)
    could block or crash."""

    exit_now: bool = False


DEBUG_ENV = "DEEPSEEK_JAX_DEBUG"


def debugging(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report_errors(prog: str) -> Callable[[Callable], Callable]:
    """Decorate a command's main: a UserError becomes `prog: message` on stderr, exit 2."""

    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except UserError as e:
                if debugging():
                    raise
                print(f"{prog}: {e}", file=sys.stderr)
                if e.exit_now:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(2)
                sys.exit(2)

        return run

    return wrap
