"""Registry of spec families by name: each turns tensor shapes into a PermutationSpec."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rebasin.core.registry import Registry
from rebasin.spec.core import PermutationSpec

Shapes = Mapping[str, tuple[int, ...]]
Config = Mapping[str, Any] | None
SpecBuilder = Callable[..., PermutationSpec]
"""``build(shapes, order)`` or ``build(shapes, order, config)``: config is a Hugging Face
config.json (a dict) when one sits next to the weights, else None."""


class NotThisFamily(Exception):
    """Raised by a spec builder whose family does not fit the tensors; the message says why."""


@dataclass(frozen=True)
class SpecFamily:
    """A named way of inferring a spec from tensor names and shapes."""

    name: str
    description: str
    builder: SpecBuilder
    typical: str | None = None
    """A regex matching tensor names typical of the family (for "closest family" suggestions)."""

    def build(self, shapes: Shapes, order: Sequence[str] | None, config: Config = None) -> PermutationSpec:
        """Run the builder (passing ``config`` where it takes one)."""
        if len(inspect.signature(self.builder).parameters) >= 3:
            return self.builder(shapes, order, config)
        return self.builder(shapes, order)


FAMILIES: Registry[SpecFamily] = Registry(
    "spec family", builtins=("rebasin.spec.names", "rebasin.spec.hf"), more=", or a spec file"
)


def register_spec(
    name: str, description: str, typical: str | None = None
) -> Callable[[SpecBuilder], SpecBuilder]:
    """Decorator registering a spec builder under ``name`` (a name may be registered once);
    ``typical`` is a regex matching the family's usual tensor names."""

    def deco(fn: SpecBuilder) -> SpecBuilder:
        FAMILIES.add(name, SpecFamily(name, description, fn, typical))
        return fn

    return deco


def list_specs() -> list[SpecFamily]:
    """Registered spec families, in the order automatic inference tries them."""
    return FAMILIES.values()


def get_spec_family(name: str) -> SpecFamily:
    """Look a family up by name; unknown names fail with close matches."""
    return FAMILIES.get(name)
