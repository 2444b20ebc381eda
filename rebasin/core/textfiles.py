"""Reading the small text files people hand over (spec files, batch plans): regular files of
bounded size, YAML without aliases (an alias bomb expands a few lines into gigabytes), JSON."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import yaml

from rebasin.core.errors import ConfigError

MAX_BYTES = 8 << 20
"""Largest spec file or plan read (real ones are kilobytes)."""


def read_text(path: str | Path, what: str) -> str:
    """The text of a regular file of at most MAX_BYTES; ConfigError naming it otherwise."""
    p, src = Path(path), str(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError("no such file", source=src) from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} ({(e.strerror or str(e)).lower()})", source=src) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"is not a regular file; refusing to read it as a {what}", source=src)
    if st.st_size > MAX_BYTES:
        raise ConfigError(f"{what} is larger than {MAX_BYTES >> 20} MB; refusing to read it", source=src)
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} ({str(e).splitlines()[0]})", source=src) from None


def parse(text: str, source: str, what: str, as_json: bool = False) -> Any:
    """YAML (safe, no aliases) or JSON text as Python data; ConfigError with the parser's first line."""

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"YAML aliases are not allowed (line {mark.line + 1})")
            return super().compose_node(parent, index)

    try:
        data = json.loads(text) if as_json else yaml.load(text, Loader=NoAliases)
        _check_strings(data)
    except (ValueError, yaml.YAMLError, RecursionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot parse {what} ({first})", source=source) from None
    return data


def _check_strings(data: Any) -> None:
    """Every string must be valid text (an escape such as \\ud800 gives a lone surrogate)."""
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"invalid text {x!r} (a lone surrogate escape)") from None
        elif isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, list):
            stack += x


def read_data(path: str | Path, what: str) -> Any:
    """Read and parse a YAML or JSON file (by suffix)."""
    return parse(read_text(path, what), str(path), what, as_json=Path(path).suffix == ".json")


class DuplicateKey(ValueError):
    """A JSON object that repeats a key (a second value would silently win)."""


def strict_json(data: str | bytes) -> Any:
    """``json.loads`` that refuses repeated keys (:class:`DuplicateKey`) and answers deep nesting
    with a ValueError instead of a RecursionError."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise DuplicateKey(f"repeats the key '{k}'")
            out[k] = v
        return out

    try:
        return json.loads(data, object_pairs_hook=pairs)
    except RecursionError:
        raise ValueError("nested too deeply") from None
