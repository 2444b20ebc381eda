"""Where every unit of a PLeaS merge comes from (Nasery et al., "PLeaS: Merging Models with
Permutations and Least Squares").

A group of ``n`` units, aligned (B already permuted to A's coordinates, so A's unit i pairs with
pi(B)'s unit i), merges its ``k`` best-correlated pairs and keeps the other ``n - k`` units of each
model apart. The merged axis has ``n + (n - k)`` units, in three blocks: ``[merged | A kept | B
kept]``. A :class:`Layout` says, for each new unit, which unit of A and of pi(B) it is made from
(-1: none). The same layout places the weights (:func:`widen_state`) and the target features of
the least-squares step (:func:`place`): a new tensor is ``c (gather_A(A) + gather_B(pi(B)))``,
where ``c`` is 1/2 on outputs both models feed (a merged unit averages) and 1 on a kept unit's
outputs (only its own model feeds it). Inputs a model does not have read zeros, so a unit kept
from A never reads B's kept units.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rebasin.evaluate.metrics import transposed_dense
from rebasin.spec.core import Axis, PermutationSpec, parts


@dataclass(frozen=True)
class Layout:
    """The units of one merged axis: ``a[j]`` / ``b[j]`` is the unit of A / pi(B) that new unit
    ``j`` is made from, -1 where that model has none."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.a)

    @property
    def identity(self) -> bool:
        """Every unit merged, in place (the plain average)."""
        n = len(self.a)
        ar = torch.arange(n)
        return bool(torch.equal(self.a, ar) and torch.equal(self.b, ar))

    @property
    def merged(self) -> int:
        return int(((self.a >= 0) & (self.b >= 0)).sum())

    @property
    def kept(self) -> int:
        """Units kept from each model."""
        return int(((self.a >= 0) & (self.b < 0)).sum())

    def scale(self) -> torch.Tensor:
        """The factor on each new unit as an output: 1/2 where both models feed it, else 1."""
        both = (self.a >= 0) & (self.b >= 0)
        return torch.where(both, 0.5, 1.0)

    def side(self) -> torch.Tensor:
        """0 for a merged unit, 1 for a unit kept from A, 2 for one kept from B."""
        return torch.where(self.b < 0, 1, torch.where(self.a < 0, 2, 0))

    @classmethod
    def of(cls, merged: torch.Tensor, n: int) -> Layout:
        """The layout of an aligned group of ``n`` units merging the units ``merged`` (sorted)."""
        mask = torch.zeros(n, dtype=torch.bool)
        mask[merged] = True
        m, k = torch.arange(n)[mask], torch.arange(n)[~mask]
        none = torch.full_like(k, -1)
        return cls(torch.cat([m, k, none]), torch.cat([m, none, k]))

    @classmethod
    def apart(cls, n_a: int, n_b: int) -> Layout:
        """Nothing merged: A's units then B's (separate task heads)."""
        return cls(
            torch.cat([torch.arange(n_a), torch.full((n_b,), -1)]),
            torch.cat([torch.full((n_a,), -1), torch.arange(n_b)]),
        )


def merged_count(n: int, width: float) -> int:
    """Units merged so the group's merged width is ``width`` times ``n`` (1.0: all, 2.0: none)."""
    return n - min(n, max(0, round((width - 1.0) * n)))


def choose_merged(correlation: np.ndarray | torch.Tensor, perm: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` aligned positions whose matched pair correlates best (sorted): position i pairs
    A's unit i with B's unit ``perm[i]``; ``correlation`` is A's units x B's units."""
    c = torch.as_tensor(np.asarray(correlation), dtype=torch.float64)
    n = len(perm)
    matched = c[torch.arange(n), perm.long()]
    matched = torch.nan_to_num(matched, nan=-2.0)
    order = torch.sort(-matched, stable=True).indices  # ties: the lower position first
    return torch.sort(order[:k]).values


FEATURES_LAST = (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvTransposeNd)
"""Modules whose weight's axis 1 indexes the features they produce."""


def output_axes(model: nn.Module) -> dict[str, int]:
    """The axis of each parameter that indexes the features its module produces, where it is
    not axis 0: an embedding's feature axis, a transposed layer (Hugging Face ``Conv1D``)."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if transposed_dense(module) or isinstance(module, FEATURES_LAST):
            out[f"{prefix}weight"] = 1
    return out


AxisLayouts = dict[str, list[tuple[Layout, int] | None]]
"""Parameter -> per axis: the axis's layout and its inner block length, or None (unchanged)."""


def axis_layouts(
    spec: PermutationSpec,
    layouts: Mapping[str, Layout],
    extra: Mapping[tuple[str, int], Layout] | None = None,
) -> AxisLayouts:
    """Each parameter's axes that change, from the groups' layouts (identity layouts left out)
    and ``extra`` (param, axis) layouts (separate task heads)."""
    out: AxisLayouts = {}
    for p, entries in spec.axes_to_perm.items():
        for axis, e in enumerate(entries):
            for part in parts(e):
                lay = layouts.get(part.group)
                if lay is None or lay.identity:
                    continue
                assert isinstance(e, Axis), "a widened group has no fused segments"
                row = out.setdefault(p, [None] * len(entries))
                row[axis] = (lay, part.inner)
    for (p, axis), lay in (extra or {}).items():
        row = out.setdefault(p, [])
        row += [None] * (axis + 1 - len(row))
        row[axis] = (lay, 1)
    return out


def _gather(t: torch.Tensor, axis: int, src: torch.Tensor, inner: int) -> torch.Tensor:
    """``t`` along ``axis`` (viewed as units x ``inner``) at units ``src``; -1 gives zeros."""
    shape = list(t.shape)
    v = t.reshape(*shape[:axis], shape[axis] // inner, inner, *shape[axis + 1 :])
    v = torch.cat([v, torch.zeros_like(v.narrow(axis, 0, 1))], axis)
    idx = torch.where(src < 0, v.shape[axis] - 1, src)
    out = v.index_select(axis, idx)
    return out.reshape(*shape[:axis], len(src) * inner, *shape[axis + 1 :])


def place(
    ta: torch.Tensor, tb: torch.Tensor, row: list[tuple[Layout, int] | None], out_axis: int
) -> torch.Tensor:
    """One merged tensor from A's and pi(B)'s (float32): each changed axis gathered by its
    layout, scaled by the output axis's factors (1/2 on an output axis no layout changes)."""
    ga, gb = ta.float(), tb.float()
    for axis, item in enumerate(row):
        if item is not None:
            lay, inner = item
            ga, gb = _gather(ga, axis, lay.a, inner), _gather(gb, axis, lay.b, inner)
    item = row[out_axis] if out_axis < len(row) else None
    if item is None or ga.dim() == 0:
        return (ga + gb) * 0.5
    lay, inner = item
    shape = [1] * ga.dim()
    shape[out_axis] = -1
    return (ga + gb) * lay.scale().repeat_interleave(inner).reshape(shape)


def widen_state(
    a: Mapping[str, torch.Tensor],
    b_aligned: Mapping[str, torch.Tensor],
    layouts: AxisLayouts,
    out_axes: Mapping[str, int],
) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged state, one tensor at a time (A's dtypes): non-float tensors (step counters)
    are A's."""
    for k in a:
        ta, tb = a[k], b_aligned[k]
        if not ta.is_floating_point():
            yield k, ta
            continue
        yield k, place(ta, tb, layouts.get(k, []), out_axes.get(k, 0)).to(ta.dtype)


def new_shapes(shapes: Mapping[str, tuple[int, ...]], layouts: AxisLayouts) -> dict[str, tuple[int, ...]]:
    """The merged checkpoint's shapes."""
    out = {}
    for k, shape in shapes.items():
        s = list(shape)
        for axis, item in enumerate(layouts.get(k, [])):
            if item is not None:
                s[axis] = item[0].size * item[1]
        out[k] = tuple(s)
    return out
