"""Union-find over tensor axes, with the structure found between classes (flattens, fused axes,
head structure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Axes:
    """Union-find over axis nodes, with the structure found between classes."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)  # node -> reason (resolved on roots later)
    merges: list[tuple[int, list[int]]] = field(default_factory=list)  # out = flatten(ins)
    cats: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)  # whole = cat(pieces)
    heads: list[tuple[int, int, str | None]] = field(default_factory=list)  # node, count, tie
    hints: dict[int, str] = field(default_factory=dict)  # node -> group name

    def new(self, n: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(n))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def link(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # cannot move together: keep both still
            self.fix(ra, "axes of different lengths meet")
            self.fix(rb, "axes of different lengths meet")
        self.parent[rb] = ra

    def fix(self, i: int, reason: str) -> None:
        self.fixed.setdefault(i, reason)

    def fixed_roots(self) -> set[int]:
        return {self.find(j) for j in self.fixed}


Value = Any
"""A recorded value: list[int] for a tensor (one node per dim), a tuple of Values, or None."""
