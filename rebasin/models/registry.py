"""Registry of built-in model factories by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from rebasin.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under ``name`` (once)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model '{name}' is already registered")
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Names of the registered models."""
    return list(_MODELS)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; unknown names fail with close matches."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else None
        raise ConfigError(f"unknown model '{name}' (known: {', '.join(_MODELS)})", hint)
    try:
        return _MODELS[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad arguments for model '{name}': {e}") from None
