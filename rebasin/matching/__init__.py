"""Matching: find the permutation of B that aligns it with A.

Matchers are registered by name (:mod:`rebasin.matching.registry`); the built-in ones live in
:mod:`rebasin.matching.methods`. Imports are lazy: reading the registry imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rebasin.matching.registry import MatchProblem, get_matcher

if TYPE_CHECKING:
    import torch

    from rebasin.core.types import Permutation, Progress
    from rebasin.matching.activation import Features
    from rebasin.matching.mergemany import ManyResult, MergeMany
    from rebasin.matching.methods import ActivationMatching, SinkhornRebasin, StraightThrough, WeightMatching
    from rebasin.matching.registry import (
        CallableData,
        DataSide,
        Matcher,
        MatchProblem,
        get_matcher,
        list_matchers,
        register_matcher,
    )
    from rebasin.matching.result import GroupStats, MatchResult, RestartTrace
    from rebasin.spec.core import PermutationSpec

_EXPORTS = {
    "Features": "rebasin.matching.activation",
    "ManyResult": "rebasin.matching.mergemany",
    "MergeMany": "rebasin.matching.mergemany",
    "ActivationMatching": "rebasin.matching.methods",
    "SinkhornRebasin": "rebasin.matching.methods",
    "StraightThrough": "rebasin.matching.methods",
    "WeightMatching": "rebasin.matching.methods",
    "CallableData": "rebasin.matching.registry",
    "DataSide": "rebasin.matching.registry",
    "Matcher": "rebasin.matching.registry",
    "MatchProblem": "rebasin.matching.registry",
    "get_matcher": "rebasin.matching.registry",
    "list_matchers": "rebasin.matching.registry",
    "register_matcher": "rebasin.matching.registry",
    "GroupStats": "rebasin.matching.result",
    "MatchResult": "rebasin.matching.result",
    "Permutation": "rebasin.core.types",
    "Progress": "rebasin.core.types",
    "RestartTrace": "rebasin.matching.result",
}


def match(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    method: str = "weight",
    *,
    progress: Progress | None = None,
    data: DataSide | None = None,
    seed: int = 0,
    device: str = "cpu",
    **options: Any,
) -> MatchResult:
    """Align ``b`` to ``a`` under ``spec`` with the registered method ``method`` (``weight`` here,
    which needs no model or data; commands and plans default to ``auto``), configured by
    ``options`` (an option the method does not use is an error naming the methods that do).
    Data-driven methods need ``data`` (see :class:`rebasin.matching.registry.DataSide`)."""

    matcher = get_matcher(method, **options)
    return matcher.match(MatchProblem(a, b, spec, data, seed, device), progress)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rebasin.matching' has no attribute {name!r}")


__all__ = [
    "ActivationMatching",
    "CallableData",
    "DataSide",
    "Features",
    "GroupStats",
    "ManyResult",
    "MatchProblem",
    "MatchResult",
    "Matcher",
    "MergeMany",
    "Permutation",
    "Progress",
    "RestartTrace",
    "SinkhornRebasin",
    "StraightThrough",
    "WeightMatching",
    "get_matcher",
    "list_matchers",
    "match",
    "register_matcher",
]
