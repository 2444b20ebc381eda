"""One registry helper for everything looked up by name: spec families, models, data sets, matchers.

A name is registered once; an unknown name fails with the known names and the closest matches.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from rebasin.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one ``kind`` (``"model"``, ``"data set"``, ...) by name, in registration order.

    ``builtins`` names the modules whose decorators register the built-in entries: they are
    imported, in that order, before the first lookup or registration (so importing a registry
    imports nothing, and built-ins always come first, in their order)."""

    def __init__(self, kind: str, builtins: Sequence[str] = (), more: str = "", known: str = "known"):
        self.kind = kind
        self.known = known
        """How the unknown-name error introduces the list of names (``known``, ``built-in``)."""
        self.more = more
        """Said after the names in the unknown-name error (e.g. ``, or a spec file``)."""
        self._entries: dict[str, T] = {}
        self._builtins = tuple(builtins)

    def _load(self) -> None:
        """Import the built-in modules in order; one being imported right now (its first
        registration got here) registers its own entries next, and the ones after it wait for
        the next call, so the order is always the built-ins' order."""
        while self._builtins:
            running = sys.modules.get(self._builtins[0])
            if running is not None and getattr(getattr(running, "__spec__", None), "_initializing", False):
                return
            importlib.import_module(self._builtins[0])
            self._builtins = self._builtins[1:]

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a second registration of a name is an error."""
        self._load()
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self._load()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def values(self) -> list[T]:
        """Registered entries, in registration order."""
        self._load()
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs, in registration order."""
        self._load()
        return list(self._entries.items())

    def suggest(self, name: str) -> str | None:
        """A ``did you mean`` hint naming the closest registered names, or None."""
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else None

    def unknown(self, name: str) -> ConfigError:
        """The error for a name that is not registered."""
        names = ", ".join(self.names())
        return ConfigError(
            f"unknown {self.kind} '{name}' ({self.known}: {names}{self.more})", self.suggest(name)
        )

    def get(self, name: str) -> T:
        """The entry registered as ``name``; unknown names fail with close matches."""
        self._load()
        if name not in self._entries:
            raise self.unknown(name)
        return self._entries[name]
