"""Fitting a checkpoint into a model: names, tied aliases, shapes, and loading with clear errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rebasin.checkpoint.state import LazyStateDict, info_of, shape_of
from rebasin.core.errors import ConfigError


def renamed(model: nn.Module, state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` under the model's module names, where its checkpoint names differ (Hugging Face
    models whose saved layout transformers renames on load carry ``rebasin_key_map``)."""
    key_map = getattr(model, "rebasin_key_map", None)
    if not key_map:
        return state
    back = {key_map.get(k, k): k for k in state}
    info = info_of(state)
    named = {n: info[k] for n, k in back.items() if k in info} if info is not None else None
    return LazyStateDict(back, lambda n: state[back[n]], named)  # read on access, as ``state`` is


def tied_aside(own: dict[str, torch.Tensor], state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``own`` without the keys a checkpoint may leave out because they are tied to another key it
    has (an LM head sharing the input embedding, stored once)."""
    present = {v.data_ptr() for k, v in own.items() if k in state}
    return {k: v for k, v in own.items() if k in state or v.data_ptr() not in present}


def fit_problems(own: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """The first differences between a model's state dict and a checkpoint's tensor shapes."""
    problems = []
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    if missing:
        problems.append("missing " + ", ".join(f"'{k}'" for k in missing[:3]))
    if unexpected:
        problems.append("unexpected " + ", ".join(f"'{k}'" for k in unexpected[:3]))
    for k, v in own.items():
        if k in shapes and tuple(shapes[k]) != tuple(v.shape):
            problems.append(f"'{k}' has shape {tuple(shapes[k])}, the model expects {tuple(v.shape)}")
            if len(problems) >= 3:
                break
    return problems


def check_fits(
    model: nn.Module, shapes: Mapping[str, Sequence[int]], source: str, model_name: str, made: str = "trained"
) -> dict[str, torch.Tensor]:
    """The model's tensors a checkpoint with these ``shapes`` (under the model's names) must
    supply (tied aliases it stores once aside); ConfigError naming the first differences."""
    own = tied_aside(model.state_dict(), shapes)
    problems = fit_problems(own, shapes)
    if problems:
        raise ConfigError(
            f"model '{model_name}' does not fit the checkpoint: " + "; ".join(problems),
            f"pass the --model (and --model-args) the checkpoint was {made} with",
            source=source,
        )
    return own


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, model_name: str) -> None:
    """Load ``state`` into ``model`` strictly; on mismatch name the first differing tensors. A
    lazy state that knows its shapes is read one tensor at a time (never held whole)."""
    state = renamed(model, state)
    if info_of(state) is None:  # shapes only by producing the tensors: produce each once
        state = {k: state[k] for k in state}
    own = check_fits(model, {k: shape_of(state, k) for k in state}, source, model_name)
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])  # casts to the model's dtype in place
