"""Matching: find the permutation of B that aligns it with A."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from rebasin.errors import ConfigError
from rebasin.matching.activation import ActivationMatching, Features
from rebasin.matching.many import ManyResult, MergeMany
from rebasin.matching.result import GroupStats, MatchResult, Permutation, Progress, RestartTrace
from rebasin.matching.weight import WeightMatching
from rebasin.spec.core import PermutationSpec

METHODS = ("weight", "activation")
DATA_METHODS = ("activation",)


def match(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    method: str = "weight",
    *,
    progress: Progress | None = None,
    features: Features | None = None,
    **options: Any,
) -> MatchResult:
    """Align ``b`` to ``a`` under ``spec`` with the named method (options go to its solver).

    Data-driven methods (``activation``) need ``features``: a callable running a state dict on data
    and yielding per-batch activations for each group (see :mod:`rebasin.matching.activation`)."""
    if method == "activation":
        if features is None:
            raise ConfigError("method 'activation' needs data: pass --data (and a model, --model)")
        known = {"backend"}  # seed, restarts, ... do not apply: activation matching is exact
        return ActivationMatching(**{k: v for k, v in options.items() if k in known}).match(
            a, b, spec, features, progress
        )
    if method == "weight":
        try:
            solver = WeightMatching(**options)
        except TypeError as e:
            raise ConfigError(f"bad option for weight matching: {e}") from None
        return solver.match(a, b, spec, progress=progress)
    raise ConfigError(f"unknown matching method '{method}' (available: {', '.join(METHODS)})")


__all__ = [
    "DATA_METHODS",
    "METHODS",
    "ActivationMatching",
    "Features",
    "GroupStats",
    "ManyResult",
    "MatchResult",
    "MergeMany",
    "Permutation",
    "Progress",
    "RestartTrace",
    "WeightMatching",
    "match",
]
