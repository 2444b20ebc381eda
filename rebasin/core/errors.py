"""Typed errors. Each carries a one-line message (naming the file or tensor) and an optional hint."""

from __future__ import annotations

from collections.abc import Iterable


class RebasinError(Exception):
    """Base error: ``message`` is one line, ``hint`` says what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, *, source: str | None = None):
        self.message = message
        self.hint = hint
        self.source = source
        super().__init__(self.line())

    def line(self) -> str:
        """The message as printed: ``<source>: <message>`` when a file is known."""
        return f"{self.source}: {self.message}" if self.source else self.message

    def __reduce__(self) -> tuple[object, ...]:  # whole across processes: message, hint, source
        return (_rebuilt, (type(self), dict(self.__dict__)))


def _rebuilt(cls: type[RebasinError], fields: dict[str, object]) -> RebasinError:
    e = cls.__new__(cls)
    e.__dict__.update(fields)
    Exception.__init__(e, e.line())
    return e


class CheckpointError(RebasinError):
    """A checkpoint cannot be read, written, or is unfit for merging."""


class SpecError(RebasinError):
    """A permutation spec is invalid or cannot be inferred; collects every problem."""

    def __init__(
        self,
        problems: str | Iterable[str],
        hint: str | None = None,
        *,
        source: str | None = None,
    ):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems), hint, source=source)


class MatchError(RebasinError):
    """A matching algorithm was misconfigured or failed."""


class ConfigError(RebasinError):
    """Bad options or usage."""


def error_line(e: BaseException, limit: int = 300) -> str:
    """One line for any error: a RebasinError's own line, an OS error's file and reason, else the
    exception's type and the first line of its message (cut at ``limit`` characters)."""
    if isinstance(e, RebasinError):
        line = e.line()
    elif isinstance(e, OSError) and e.strerror:
        reason = e.strerror[0].lower() + e.strerror[1:]
        line = f"{e.filename}: {reason}" if e.filename else reason
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        line = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
