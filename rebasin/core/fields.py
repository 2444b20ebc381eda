"""Declaring options (:func:`option` on a dataclass field) and checking their values, in one place."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rebasin.core.errors import ConfigError

_META = "rebasin.option"


@dataclass(frozen=True)
class OptionInfo:
    """Everything known about one option (derived from its dataclass field)."""

    name: str
    """Python attribute and batch plan key."""
    stage: str
    kind: type
    """``int``, ``float``, ``str``, ``bool``, ``list`` (of strings) or ``dict`` (a JSON object)."""
    default: Any
    help: str
    flag: str
    short: str | None = None
    choices: tuple[str, ...] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    metavar: str | None = None
    commands: tuple[str, ...] = ()
    plan: bool = True
    methods: tuple[str, ...] | None = None
    """For a matcher's own options: the methods that use it (None: every method)."""
    default_text: str | None = None
    """How the docs and help show the default, where the value alone would mislead."""
    command_defaults: tuple[tuple[str, Any], ...] = ()
    """Defaults of particular commands, where they differ (``train``'s ``--data mnist1d``)."""
    extra_choices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Choices only some commands accept (``barrier --method none``)."""

    def label(self, style: str) -> str:
        """How errors name the option: ``--max-iter`` on the command line, ``'max_iter'`` in a plan."""
        return self.flag if style == "cli" else f"'{self.name}'"

    def default_for(self, command: str) -> Any:
        """The default ``command`` uses."""
        return dict(self.command_defaults).get(command, self.default)

    def choices_for(self, command: str) -> tuple[str, ...] | None:
        """The values ``command`` accepts (None: any value of the option's type)."""
        if self.choices is None:
            return None
        return self.choices + dict(self.extra_choices).get(command, ())


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    metavar: str | None = None,
    commands: Sequence[str] = (),
    plan: bool = True,
    default_text: str | None = None,
    command_defaults: Mapping[str, Any] | None = None,
    extra_choices: Mapping[str, Sequence[str]] | None = None,
) -> Any:
    """Declare a dataclass field as an option (see :class:`OptionInfo` for the meanings).
    ``choices`` may be a function giving them (names read from a registry when asked)."""
    meta = {
        "help": help,
        "flag": flag,
        "short": short,
        "choices": choices,
        "ge": ge,
        "gt": gt,
        "le": le,
        "metavar": metavar,
        "commands": tuple(commands),
        "plan": plan,
        "default_text": default_text,
        "command_defaults": tuple((command_defaults or {}).items()),
        "extra_choices": tuple((k, tuple(v)) for k, v in (extra_choices or {}).items()),
    }
    if isinstance(default, list | dict):
        raise TypeError("use a tuple or None as the default of a list or mapping option")
    return field(default=default, metadata={_META: meta})


def _kind(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _kind(args[0])
    if origin in (tuple, list) or annotation in (tuple, list):
        return list
    if origin in (dict, Mapping) or annotation is dict:
        return dict
    if annotation in (int, float, str, bool):
        return typing.cast(type, annotation)
    raise TypeError(f"unsupported option type {annotation!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A class's resolved annotations, once (resolved anew for every option lookup, checking a
    batch plan of 2000 items took 54 s)."""
    return typing.get_type_hints(cls)


def options_of(cls: type, stage: str, methods: tuple[str, ...] | None = None) -> list[OptionInfo]:
    """The options a dataclass declares, in declaration order."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        choices = meta["choices"]
        choices = tuple(choices() if callable(choices) else choices) if choices is not None else None
        out.append(
            OptionInfo(
                name=f.name,
                stage=stage,
                kind=_kind(hints[f.name]),
                default=f.default,
                methods=methods,
                **{**meta, "flag": flag, "choices": choices},
            )
        )
    return out


# ------------------------------------------------------------------------------- checking values


def _plain(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_value(info: OptionInfo, value: Any, style: str = "cli", command: str = "") -> Any:
    """Check one value against its option (type, choices, bounds, finiteness) and return it in the
    option's own type (lists become tuples, JSON text for a mapping is parsed). ``style`` says how
    the message names the option (see :meth:`OptionInfo.label`); ``command`` adds the choices only
    it accepts."""
    name = info.label(style)
    if value is None:
        return None
    kind = info.kind
    if kind is dict and isinstance(value, str):
        value = parse_json_object(value, name)
    if kind is list and isinstance(value, str):
        value = [value]
    if kind is list and isinstance(value, tuple):
        value = list(value)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{name} must be {kind.__name__}, got {_plain(value)}")
    if kind is list:
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {_plain(value)}")
        value = tuple(value)
    choices = info.choices_for(command)
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {_plain(value)}")
    if kind in (int, float):
        _check_number(info, name, value)
    return value


def _check_number(info: OptionInfo, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if info.ge is not None and info.le is not None and not info.ge <= value <= info.le:
        raise ConfigError(f"{name} must lie in [{_num(info.ge)}, {_num(info.le)}], got {value}")
    if info.ge is not None and value < info.ge:
        raise ConfigError(f"{name} must be at least {_num(info.ge)}, got {value}")
    if info.gt is not None and value <= info.gt:
        raise ConfigError(f"{name} must be greater than {_num(info.gt)}, got {value}")
    if info.le is not None and value > info.le:
        raise ConfigError(f"{name} must be at most {_num(info.le)}, got {value}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def parse_json_object(text: str, name: str = "--model-args") -> dict[str, Any]:
    """A JSON object given as text (``--model-args '{"hidden": 512}'``) as a dict."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object, e.g. '{{\"hidden\": 512}}'")
    return value


def construct(cls: type, kw: dict[str, Any], style: str) -> Any:
    """``cls(**kw)``; in a plan (``style`` not ``cli``), messages name plan keys, not flags."""
    try:
        return cls(**kw)
    except ConfigError as e:
        if style == "cli":
            raise
        message = e.message
        for info in options_of(cls, ""):
            message = message.replace(info.flag, f"'{info.name}'")
        raise ConfigError(message, e.hint, source=e.source) from None


class Checked:
    """Mixin for option dataclasses: every declared option is checked on construction."""

    def __post_init__(self) -> None:
        for info in options_of(type(self), ""):
            extra = {c for _, cs in info.extra_choices for c in cs}
            value = getattr(self, info.name)
            if not (
                isinstance(value, str) and value in extra
            ):  # accepted by some command: checked where the command is known
                object.__setattr__(self, info.name, check_value(info, value, "cli"))


EPOCHS_HELP = "Passes over the training data in mini-batches."
LR_HELP = "Learning rate of the Adam optimizer."
SEED_HELP = "Seed of every random choice: initialization, data order, group orders, restarts, permutations."
"""Help of options declared in more than one place (a stage and a matcher): one name, one meaning."""
