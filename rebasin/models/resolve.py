"""Turn a model argument (built-in name, ``MODULE:FACTORY``, ``file.py:FACTORY``) or a checkpoint's
metadata into a factory of fresh models."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rebasin._imports import import_object
from rebasin.errors import ConfigError
from rebasin.models.registry import build_model, list_models

ARCH_KEY = "rebasin.arch"
ARGS_KEY = "rebasin.arch_args"
DATA_KEY = "rebasin.data"


@dataclass(frozen=True)
class ModelRef:
    """How to build the model: a name (built-in or import path) and keyword arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """A fresh model."""
        return _factory(self.name)(**self.args)

    def factory(self) -> Callable[[], nn.Module]:
        """A zero-argument factory (checked once)."""
        fn = _factory(self.name)
        args = dict(self.args)
        try:
            fn(**args)
        except TypeError as e:
            raise ConfigError(f"bad arguments for model '{self.name}': {e}") from None
        return lambda: fn(**args)

    def metadata(self) -> dict[str, str]:
        """Checkpoint metadata that lets later commands rebuild this model."""
        return {ARCH_KEY: self.name, ARGS_KEY: json.dumps(self.args, sort_keys=True)}


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``--model-args`` JSON object -> dict."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--model-args is not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise ConfigError("--model-args must be a JSON object, e.g. '{\"hidden\": 512}'")
    return args


def resolve_model(
    model: str | None, model_args: str | dict[str, Any] | None, metadata: Mapping[str, str], source: str
) -> ModelRef:
    """The model to use: the ``--model`` given, else the architecture recorded in ``metadata``."""
    args = parse_model_args(model_args) if isinstance(model_args, str | type(None)) else dict(model_args)
    if model:
        ref = ModelRef(model, args)
    elif ARCH_KEY in metadata:
        try:
            recorded = json.loads(metadata.get(ARGS_KEY, "{}"))
        except ValueError:
            recorded = {}
        ref = ModelRef(metadata[ARCH_KEY], {**recorded, **args})
    else:
        raise ConfigError(
            "no model definition: the checkpoint records no architecture",
            f"pass --model NAME (built-in: {', '.join(list_models())}) or --model MODULE:FACTORY",
            source=source,
        )
    _factory(ref.name)  # fail early on unknown names
    return ref


def _factory(name: str) -> Callable[..., nn.Module]:
    if ":" not in name:
        if name not in list_models():
            build_model(name)  # raises the unknown-model error with suggestions
        return lambda **kw: build_model(name, **kw)
    fn: Callable[..., nn.Module] = import_object(name)
    return fn
