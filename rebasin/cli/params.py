"""Command-line options derived from the options model (:mod:`rebasin.options`).

:func:`with_options` adds every option a command takes to the command function's signature as a
typer option (flag, help, choices and the methods that use it all come from the model) and hands
the given values to the function as one ``values`` mapping. Values are checked by the model, so a
bad number gets the same one-line ``error:`` as any other bad input.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import typer

from rebasin.options import OptionInfo, describe_defaults, for_command

F = TypeVar("F", bound=Callable[..., Any])


def choice(names: Sequence[str]) -> Any:
    """A type typer offers as a choice of these names."""
    return Literal.__getitem__(tuple(names))


def _help(info: OptionInfo) -> str:
    text = info.help
    default = describe_defaults(info)
    if info.methods is not None:
        text += f" Used by --method {', '.join(info.methods)}."
    if default and info.kind is not bool:
        text += f" (default: {default})"
    return text


def cli_parameter(
    info: OptionInfo, required: bool = False, choices: Sequence[str] | None = None
) -> inspect.Parameter:
    """The typer parameter of one option (``required``: no default; ``choices``: those the
    command accepts, e.g. ``barrier --method`` adds ``none``)."""
    choices = choices if choices is not None else info.choices
    decls = [info.flag, *([info.short] if info.short else [])]
    kwargs: dict[str, Any] = {"help": _help(info), "show_default": False}
    if info.metavar:
        kwargs["metavar"] = info.metavar
    if info.kind is bool:
        annotation: Any = bool
        default: Any = typer.Option(False, *decls, **kwargs)
    else:
        plain: dict[type, Any] = {list: list[str], dict: str}
        annotation = choice(choices) if choices else plain.get(info.kind, info.kind)
        if not required:
            annotation = annotation | None
        default = typer.Option(... if required else None, *decls, **kwargs)
    return inspect.Parameter(
        info.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def with_options(command: str, required: Sequence[str] = ()) -> Callable[[F], F]:
    """Decorator: the function's own parameters stay; every option of ``command`` in the options
    model is added (with the choices ``command`` accepts), and the function receives their given
    values as ``values`` (a dict; options not given are absent)."""
    infos = for_command(command)

    def deco(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "values"]
        added = [cli_parameter(i, i.name in required, i.choices_for(command)) for i in infos]
        names = {i.name for i in infos}

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            values = {k: v for k, v in values.items() if v is not None and v != [] and v is not False}
            return fn(*args, values=values, **kwargs)

        ordered = sorted(own + added, key=lambda p: p.kind)
        wrapper.__signature__ = sig.replace(parameters=ordered)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in ordered}
        return wrapper  # type: ignore[return-value]

    return deco
