"""rebasin: merge neural networks modulo permutation symmetry.

The public API is imported lazily, so ``import rebasin`` (and ``rebasin --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rebasin._version import __version__

DISTRIBUTION = "basinmerge"
"""The name this project is installed under (``pip install basinmerge``); the import package and
the command are ``rebasin``. PyPI's ``rebasin`` and ``sinkhorn-rebasin`` are other projects."""

_EXPORTS = {
    "load_checkpoint": "rebasin.checkpoint",
    "save_checkpoint": "rebasin.checkpoint",
    "Checkpoint": "rebasin.checkpoint",
    "PermutationSpec": "rebasin.spec.core",
    "load_spec": "rebasin.spec.core",
    "dump_spec": "rebasin.spec.core",
    "infer_spec": "rebasin.spec.names",
    "register_spec": "rebasin.spec.registry",
    "list_specs": "rebasin.spec.registry",
    "match": "rebasin.matching",
    "MatchResult": "rebasin.matching.result",
    "WeightMatching": "rebasin.matching.methods",
    "get_matcher": "rebasin.matching.registry",
    "list_matchers": "rebasin.matching.registry",
    "register_matcher": "rebasin.matching.registry",
    "Options": "rebasin.options",
    "build_options": "rebasin.options",
    "permute": "rebasin.permutation",
    "invert": "rebasin.permutation",
    "compose": "rebasin.permutation",
    "random_permutation": "rebasin.permutation",
    "interpolate": "rebasin.merge",
    "average": "rebasin.merge",
    "merge_checkpoints": "rebasin.commands",
    "MergeOptions": "rebasin.options",
    "barrier_checkpoints": "rebasin.commands",
    "barrier_map": "rebasin.commands",
    "RebasinError": "rebasin.core.errors",
}

__all__ = [
    "Checkpoint",
    "MatchResult",
    "MergeOptions",
    "Options",
    "PermutationSpec",
    "RebasinError",
    "WeightMatching",
    "__version__",
    "average",
    "barrier_checkpoints",
    "barrier_map",
    "build_options",
    "compose",
    "dump_spec",
    "get_matcher",
    "infer_spec",
    "interpolate",
    "invert",
    "list_matchers",
    "list_specs",
    "load_checkpoint",
    "load_spec",
    "match",
    "merge_checkpoints",
    "permute",
    "random_permutation",
    "register_matcher",
    "register_spec",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from rebasin.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from rebasin.commands import barrier_checkpoints, barrier_map, merge_checkpoints
    from rebasin.core.errors import RebasinError
    from rebasin.matching import match
    from rebasin.matching.methods import WeightMatching
    from rebasin.matching.registry import get_matcher, list_matchers, register_matcher
    from rebasin.matching.result import MatchResult
    from rebasin.merge import average, interpolate
    from rebasin.options import MergeOptions, Options, build_options
    from rebasin.permutation import compose, invert, permute, random_permutation
    from rebasin.spec.core import PermutationSpec, dump_spec, load_spec
    from rebasin.spec.names import infer_spec
    from rebasin.spec.registry import list_specs, register_spec


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rebasin' has no attribute {name!r}")
