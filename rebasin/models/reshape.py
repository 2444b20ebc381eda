"""Models of other widths than their factory builds: a merge that widens layers (PLeaS) records
the shapes that differ, and the model is rebuilt by resizing the factory's modules to them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rebasin.core.errors import ConfigError

SHAPES_KEY = "rebasin.arch_shapes"
"""Metadata key: JSON object of tensor name -> shape, for the tensors whose shape differs from
what the recorded architecture builds."""


def resize_modules(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    """``model`` with each named tensor of ``shapes`` replaced by zeros of that shape, and its
    module's size attributes (features, channels) updated to match. Returns the model."""
    for name, shape in shapes.items():
        mod_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            continue
        old = getattr(module, attr, None)
        if not isinstance(old, torch.Tensor) or tuple(old.shape) == tuple(shape):
            continue
        new = torch.zeros(tuple(shape), dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module._buffers[attr] = new
        _resize_attributes(module)
    return model


def _resize_attributes(m: nn.Module) -> None:
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.conv._ConvNd):
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        ref = w if w is not None else m.running_mean
        m.num_features = int(ref.shape[0])  # type: ignore[union-attr]
    elif isinstance(m, nn.LayerNorm) and w is not None:
        m.normalized_shape = tuple(w.shape)
    elif isinstance(m, nn.GroupNorm) and w is not None:
        m.num_channels = int(w.shape[0])
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = m.weight.shape


def changed_shapes(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """The entries of ``shapes`` that differ from ``model``'s own (what the record keeps)."""
    own = model.state_dict()
    return {k: list(s) for k, s in shapes.items() if k in own and tuple(own[k].shape) != tuple(s)}


def recorded_shapes(metadata: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """The shapes a checkpoint records (none when the record is absent or malformed)."""
    try:
        raw: Any = json.loads(metadata.get(SHAPES_KEY, "{}"))
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, v in raw.items():
        if isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
            out[str(k)] = tuple(v)
    return out


def check_recorded(
    recorded: Sequence[tuple[str, Sequence[int]]], shapes: Mapping[str, Sequence[int]], source: str
) -> None:
    """The recorded shapes must be the checkpoint's own (a record never asks for memory the file
    does not hold). Raises ConfigError naming the first tensor that differs."""
    for name, shape in recorded:
        if name not in shapes or tuple(shapes[name]) != tuple(shape):
            raise ConfigError(
                f"{SHAPES_KEY}: '{name}' is recorded as {tuple(shape)}, the checkpoint holds "
                f"{tuple(shapes[name]) if name in shapes else 'no such tensor'}",
                "pass --model and --model-args yourself",
                source=source,
            )
