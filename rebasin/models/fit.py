"""Fitting a checkpoint into a model: names, tied aliases, shapes, and loading with clear errors."""

from __future__ import annotations

import re
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


BUFFER_NAMES = ("position_ids", "token_type_ids", "inv_freq", "masked_bias")
"""Buffers that library versions add to or drop from checkpoints (transformers persisted
``embeddings.position_ids`` until 4.31 and no longer registers it as persistent)."""


def tolerated(model: nn.Module | None, name: str, side: str) -> bool:
    """The one rule for tensors a checkpoint and a model may disagree on, as the model's own
    library loads it: a checkpoint tensor the model does not persist (``side="unexpected"``: a
    non-persistent buffer of the model, a name its class says to ignore, or a buffer of
    :data:`BUFFER_NAMES`), or a model buffer the checkpoint lacks (``side="missing"``: a buffer,
    never a parameter, of those names; the model keeps its own)."""
    if model is None:
        return name.rsplit(".", 1)[-1] in BUFFER_NAMES
    patterns = getattr(model, f"_keys_to_ignore_on_load_{side}", None) or []
    if any(re.search(p, name) for p in patterns):
        return True
    if side == "unexpected" and name in dict(model.named_buffers()):
        return True  # registered, not persisted
    if name.rsplit(".", 1)[-1] not in BUFFER_NAMES:
        return False
    return side == "unexpected" or name not in dict(model.named_parameters())


def fit_problems(
    own: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]], model: nn.Module | None = None
) -> list[str]:
    """The first differences between a model's state dict and a checkpoint's tensor shapes
    (what :func:`tolerated` allows aside)."""
    problems = []
    missing = [k for k in own if k not in shapes and not tolerated(model, k, "missing")]
    unexpected = [k for k in shapes if k not in own and not tolerated(model, k, "unexpected")]
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
    problems = fit_problems(own, shapes, model)
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
            if k in state:  # a tolerated buffer the checkpoint lacks keeps the model's own
                v.copy_(state[k])  # casts to the model's dtype in place
