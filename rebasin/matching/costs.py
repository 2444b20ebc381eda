"""Weight-matching costs with bounded memory: ``C_g[i, j] = <A unit i, pi(B) unit j>``.

Tensors are taken from the mappings one member at a time, in their stored dtype (a lazy
checkpoint reads them from disk then), moved to the device, permuted, and multiplied a block of
columns at a time, each block upcast to float32 only for its product: the memory a cost needs is
one member's tensors plus a block, never a model. Nothing is cached but the products of members
no other group touches, so state dicts in memory and checkpoints read from disk take the same
path and give the same bits.

On CUDA, half-precision inputs (bfloat16, float16) are multiplied in TF32, which holds their
mantissas exactly, so the products equal float32 ones up to the order of summation.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from rebasin.checkpoint.state import shape_of
from rebasin.core.errors import MatchError
from rebasin.core.types import Permutation
from rebasin.permutation import permute_tensor
from rebasin.spec.core import Member, PermutationSpec

BLOCK_BYTES = 64 << 20
"""Largest float32 block of a member's columns upcast at once for a product."""

_CHUNK = 1 << 20
"""Elements per float64 block of the objective's dot products."""


class CostModel:
    """The cost matrices and objective of weight matching between two state dicts."""

    def __init__(
        self,
        a: Mapping[str, torch.Tensor],
        b: Mapping[str, torch.Tensor],
        spec: PermutationSpec,
        device: torch.device,
        buffers: Collection[str] = (),
    ):
        self.spec = spec
        self.device = device
        weighed = spec.cost_params(buffers)
        self.params = weighed
        self._a, self._b = a, b
        names = set(weighed)
        self.members = {g: [m for m in ms if m.param in names] for g, ms in spec.groups.items()}
        self._moving = {  # members whose B side other groups also permute
            m for ms in self.members.values() for m in ms if _other_axes(spec, m)
        }
        self._fixed: dict[str, torch.Tensor | None] = {}  # by group and sketch
        self._numel = {p: math.prod(shape_of(a, p)) for p in weighed}
        self.sketch = 1
        """Keep one in ``sketch`` of each product's contracted columns (a random, fixed subset,
        scaled up to an unbiased estimate): cheap approximate costs for a first phase. 1: exact."""
        self._columns: dict[tuple[Member, int], torch.Tensor] = {}

    def tensor(self, side: str, p: str) -> torch.Tensor:
        """Parameter ``p`` of A or B on the device, as stored."""
        src = self._a if side == "a" else self._b
        return src[p].to(device=self.device)

    def work(self, unit: tuple[str, ...]) -> float:
        """Multiply-adds of the unit's cost products (for progress and estimates)."""
        total = 0.0
        for g in unit:
            n = self.spec.sizes[g]
            for m in self.members[g]:
                total += n * self._numel[m.param] / self.sketch
        return total

    def unit_costs(self, unit: tuple[str, ...], perm: Permutation) -> dict[str, np.ndarray]:
        """The cost matrix of every group of ``unit`` (float32 numpy, for the assignment)."""
        return {g: self.cost(g, perm) for g in unit}

    def cost(self, g: str, perm: Permutation) -> np.ndarray:
        """``C[i, j] = <A unit i, B unit j>`` summed over the group's members (others applied)."""
        n = self.spec.sizes[g]
        c = torch.zeros(n, n, dtype=torch.float32, device=self.device)
        key = f"{g}/{self.sketch}"
        if key not in self._fixed:  # members no other group touches: their product never changes
            fixed = [m for m in self.members[g] if m not in self._moving]
            self._fixed[key] = self._sum_products(g, fixed, perm) if fixed else None
        fixed_part = self._fixed[key]
        if fixed_part is not None:
            c += fixed_part
        moving = [m for m in self.members[g] if m in self._moving]
        if moving:
            c += self._sum_products(g, moving, perm)
        out = c.cpu().numpy()  # float32: the assignment upcasts once, sums run in float64
        if not np.isfinite(out).all():
            raise MatchError(f"cost matrix of group '{g}' is not finite (weights too large?)")
        return out

    def _sum_products(self, g: str, members: list[Member], perm: Permutation) -> torch.Tensor:
        n = self.spec.sizes[g]
        c = torch.zeros(n, n, dtype=torch.float32, device=self.device)
        for m in members:
            ta = self.tensor("a", m.param)
            tb = permute_tensor(self.tensor("b", m.param), self.spec.axes_to_perm[m.param], perm, skip=g)
            ra, rb = _unit_rows(ta, m, n), _unit_rows(tb, m, n)
            scale = 1.0
            if self.sketch > 1 and ra.shape[1] >= 2 * self.sketch:
                cols = self._sketch_columns(m, ra.shape[1])
                scale = ra.shape[1] / len(cols)
                ra, rb = ra.index_select(1, cols), rb.index_select(1, cols)
            with _exact_half_products(ra.dtype, self.device):
                for lo, hi in _blocks(ra.shape[1], n):
                    c.addmm_(ra[:, lo:hi].float(), rb[:, lo:hi].float().T, alpha=scale)
            del ta, tb, ra, rb
        return c

    def _sketch_columns(self, m: Member, k: int) -> torch.Tensor:
        """The member's random subset of ``k // sketch`` columns, the same every time (seeded by
        the member's place in the spec)."""
        key = (m, self.sketch)
        if key not in self._columns:
            seed = sorted(self.spec.axes_to_perm).index(m.param) * 1009 + m.axis
            g = torch.Generator().manual_seed(seed)
            cols = torch.randperm(k, generator=g)[: k // self.sketch].sort().values
            self._columns[key] = cols.to(self.device)
        return self._columns[key]

    def objective(self, perm: Permutation) -> float:
        """``sum_params <A, pi(B)>`` over the weighed parameters, accumulated in float64."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.params:
            x = self.tensor("a", p).reshape(-1)
            y = permute_tensor(self.tensor("b", p), self.spec.axes_to_perm[p], perm).reshape(-1)
            for i in range(0, x.numel(), _CHUNK):  # float64 a block at a time: bounded memory
                total += torch.dot(x[i : i + _CHUNK].double(), y[i : i + _CHUNK].double())
        return float(total)


def _other_axes(spec: PermutationSpec, m: Member) -> bool:
    return any(e is not None for i, e in enumerate(spec.axes_to_perm[m.param]) if i != m.axis)


def _blocks(cols: int, rows: int) -> Iterator[tuple[int, int]]:
    """Column ranges of at most ``BLOCK_BYTES`` of float32 for a matrix of ``rows`` rows."""
    step = max(1, BLOCK_BYTES // (4 * max(rows, 1)))
    for lo in range(0, cols, step):
        yield lo, min(cols, lo + step)


@contextmanager
def _exact_half_products(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """TF32 products on CUDA for bfloat16/float16 inputs (exact for their mantissas)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _unit_rows(t: torch.Tensor, m: Member, n: int) -> torch.Tensor:
    """View ``t`` as one row per unit of the member's group (``n`` units): (n, everything else)."""
    t = t.movedim(m.axis, 0)
    if m.segment or t.shape[0] != n * m.inner:
        t = t[m.start : m.start + n * m.inner]
    if m.inner > 1:
        t = t.reshape(n, m.inner, *t.shape[1:])
    return t.reshape(n, -1)


def sweep_products(
    spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]], weighed: Collection[str]
) -> float:
    """Floating-point operations of one weight-matching sweep: every weighed member's cost-matrix
    product (2 n x numel for a group of n units), from shapes alone."""
    keep = set(weighed)
    return float(
        sum(
            2 * spec.sizes[g] * math.prod(shapes[m.param])
            for g, ms in spec.groups.items()
            for m in ms
            if m.param in keep
        )
    )
