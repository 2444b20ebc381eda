"""Registry of built-in model factories by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from rebasin.core.errors import ConfigError
from rebasin.core.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry(
    "model",
    builtins=(
        "rebasin.models.mlp",
        "rebasin.models.resnet",
        "rebasin.models.transformer",
        "rebasin.models.vgg",
    ),
)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a model factory under ``name`` (once)."""
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names of the registered models."""
    return MODELS.names()


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; unknown names fail with close matches."""
    factory = MODELS.get(name)
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad arguments for model '{name}': {e}") from None
