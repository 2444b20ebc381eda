"""Matching: find the permutation of B that aligns it with A."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from rebasin.errors import ConfigError
from rebasin.matching.result import GroupStats, MatchResult, Permutation, Progress, RestartTrace
from rebasin.matching.weight import WeightMatching
from rebasin.spec.core import PermutationSpec

METHODS = ("weight",)


def match(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    method: str = "weight",
    *,
    progress: Progress | None = None,
    **options: Any,
) -> MatchResult:
    """Align ``b`` to ``a`` under ``spec`` with the named method (options go to its solver)."""
    if method == "weight":
        try:
            solver = WeightMatching(**options)
        except TypeError as e:
            raise ConfigError(f"bad option for weight matching: {e}") from None
        return solver.match(a, b, spec, progress=progress)
    raise ConfigError(f"unknown matching method '{method}' (available: {', '.join(METHODS)})")


__all__ = [
    "METHODS",
    "GroupStats",
    "MatchResult",
    "Permutation",
    "Progress",
    "RestartTrace",
    "WeightMatching",
    "match",
]
