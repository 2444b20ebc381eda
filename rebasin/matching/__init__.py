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

METHODS = ("weight", "activation", "ste", "sinkhorn")
DATA_METHODS = ("activation", "ste")


def match(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    method: str = "weight",
    *,
    progress: Progress | None = None,
    features: Features | None = None,
    task_loss: Any = None,
    score: Any = None,
    **options: Any,
) -> MatchResult:
    """Align ``b`` to ``a`` under ``spec`` with the named method (options go to its solver).

    Data-driven methods (``activation``) need ``features``: a callable running a state dict on data
    and yielding per-batch activations for each group (see :mod:`rebasin.matching.activation`)."""
    if method == "sinkhorn":
        from rebasin.matching.sinkhorn import SinkhornRebasin

        known = {"cost", "steps", "lr", "tau_start", "tau_end", "seed", "device", "backend"}
        return SinkhornRebasin(**{k: v for k, v in options.items() if k in known and v is not None}).match(
            a, b, spec, task_loss, progress
        )
    if method == "ste":
        from rebasin.matching.ste import StraightThrough

        if task_loss is None or score is None:
            raise ConfigError("method 'ste' needs data: pass --data (and a model, --model)")
        known = {"steps", "lr", "seed", "device", "backend", "restarts", "estimator", "tau"}
        return StraightThrough(**{k: v for k, v in options.items() if k in known and v is not None}).match(
            a, b, spec, task_loss, score, progress
        )
    if method == "activation":
        if features is None:
            raise ConfigError("method 'activation' needs data: pass --data (and a model, --model)")
        known = {"backend"}  # seed, restarts, ... do not apply: activation matching is exact
        return ActivationMatching(**{k: v for k, v in options.items() if k in known}).match(
            a, b, spec, features, progress
        )
    if method == "weight":
        options = {k: v for k, v in options.items() if k not in ("cost", "steps", "lr")}
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
