"""How the command line fails: one ``error:`` line (plus ``hint:``), never a traceback.

Library errors exit 2 (1 is kept for failed gates); OS errors on outputs, errors raised by user
code and usage errors (unknown options, bad values) get the same one-line form. Ctrl-C and
SIGTERM end the run after the temporary files are removed.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from typer.core import TyperGroup

from rebasin.core.errors import RebasinError, error_line
from rebasin.report.render import error

try:  # typer vendors its own click from 0.2x on
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover
    from click import exceptions as cx  # type: ignore[no-redef]

F = TypeVar("F", bound=Callable[..., Any])


def handled(fn: F) -> F:
    """Turn library errors into one ``error:`` line (plus ``hint:``) and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:

        try:
            return fn(*args, **kwargs)
        except RebasinError as e:
            error(e.line(), e.hint)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Terminated:
            print("terminated", file=sys.stderr)
            raise typer.Exit(143) from None
        except (typer.Exit, cx.ClickException):
            raise
        except (OSError, MemoryError, Exception) as e:  # never a traceback for people
            if os.environ.get("REBASIN_TRACEBACK"):
                raise

            internal = not isinstance(e, OSError | MemoryError)
            line = error_line(e)
            hint = "run again with REBASIN_TRACEBACK=1 to see where it failed" if internal else None
            error(f"unexpected error: {line}" if internal else line, hint)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


class Terminated(BaseException):
    """Raised on SIGTERM, so that temporary files are removed on the way out."""


def on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value, missing argument) as one ``error:`` line."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone_mode = kwargs.pop("standalone_mode", True)
        try:
            rv = super().main(*args, **{**kwargs, "standalone_mode": False})
        except cx.NoArgsIsHelpError as e:
            print(e.ctx.get_help() if e.ctx else "", file=sys.stdout)
            rv = 0
        except cx.UsageError as e:
            cmd = e.ctx.command_path if e.ctx else "rebasin"
            print(f"error: {e.format_message()}", file=sys.stderr)
            print(f"hint: see '{cmd} --help'", file=sys.stderr)
            rv = 2
        except cx.ClickException as e:
            print(f"error: {e.format_message()}", file=sys.stderr)
            rv = e.exit_code
        except typer.Abort:
            print("interrupted", file=sys.stderr)
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)
