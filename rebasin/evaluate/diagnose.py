"""Why a barrier stays: the agreement of A's and pi(B)'s top singular directions per weight
tensor, and the barrier each layer holds alone.

Ito, Yamada and Kumagai ("Analysis of Linear Mode Connectivity via Permutation-Based Weight
Matching", arXiv:2402.04051) show that a permutation cannot change a weight matrix's singular values,
only the directions of its singular vectors, and that weight matching works by aligning the
directions that carry the largest singular values. The measure here is the subspace overlap of the
top-k directions, by principal angles: for the top-k left singular vectors ``U_A``, ``U_B`` (columns
orthonormal), ``||U_A^T U_B||_F^2 / k`` is the mean squared cosine of the k principal angles
between the two subspaces: 1 when they coincide, about k / n for unrelated ones. The same for the
right singular vectors; the agreement is their mean. Signs, and the order within tied singular
values, do not matter.

Each weight tensor is viewed as a matrix with one row per output unit (its first axis) and is
read, decomposed and dropped one at a time; large matrices take a seeded randomized top-k SVD
(Halko, Martinsson and Tropp), small ones the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from rebasin.checkpoint.state import shape_of
from rebasin.core.types import Permutation, Progress
from rebasin.permutation import permute_tensor
from rebasin.spec.core import PermutationSpec

EXACT_UP_TO = 1024
"""Matrices whose smaller side is at most this take the exact SVD; larger ones a randomized one."""

MEASURE = "mean cos^2 of the principal angles between the top-k singular subspaces (left and right)"


def top_singular(m: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triples ``(U, S, V)`` of a matrix (float32; ``k`` capped at its rank
    bound)."""
    m = m.float()
    k = min(k, *m.shape)
    if min(m.shape) <= EXACT_UP_TO:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=min(k + 10, *m.shape), niter=4)
    return u[:, :k], s[:k], v[:, :k]


def overlap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spans of ``x`` and ``y``."""
    return float((x.T @ y).square().sum() / x.shape[1])


def agreement(a: torch.Tensor, b: torch.Tensor, k: int, seed: int = 0) -> dict[str, float]:
    """Top-``k`` singular-direction agreement of two weight tensors of one shape."""
    ua, sa, va = top_singular(a.reshape(a.shape[0], -1), k, seed)
    ub, _, vb = top_singular(b.reshape(b.shape[0], -1), k, seed)
    left, right = overlap(ua, ub), overlap(va, vb)
    return {"left": left, "right": right, "agreement": (left + right) / 2, "top_singular_value": float(sa[0])}


def weight_tensors(spec: PermutationSpec, shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """The permuted tensors that are matrices with one row per output unit (two or more axes,
    more than one row and one column: 1x1 convolutions count, vectors do not), in spec order."""
    return [
        p
        for p in spec.axes_to_perm
        if len(shapes[p]) >= 2 and shapes[p][0] > 1 and math.prod(shapes[p][1:]) > 1
    ]


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: its module's name."""
    return name.rsplit(".", 1)[0] if "." in name else name


class Agreements:
    """Singular-direction agreement of every weight tensor, before and after alignment, gathered
    one tensor at a time (:meth:`add`, as a pass over the models reads them)."""

    def __init__(self, spec: PermutationSpec, shapes: Mapping[str, Sequence[int]], k: int, seed: int = 0):
        self.k, self.seed = k, seed
        self.order = weight_tensors(spec, shapes)
        self.wanted = set(self.order)
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, pib: torch.Tensor) -> None:
        if name not in self.wanted or name in self.rows or not a.is_floating_point():
            return
        self.rows[name] = {
            "tensor": name,
            "layer": layer_of(name),
            "shape": list(a.shape),
            "before": agreement(a, b, self.k, self.seed),
            "after": agreement(a, pib, self.k, self.seed),
        }

    def result(self) -> list[dict[str, Any]]:
        return [self.rows[n] for n in self.order if n in self.rows]


def gather(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perm: Permutation,
    k: int,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """:class:`Agreements` over every weight tensor, reading one tensor of each model at a time."""
    shapes = {p: shape_of(a, p) for p in spec.axes_to_perm}  # from headers: no extra read
    acc = Agreements(spec, shapes, k, seed)
    names = acc.order
    for i, p in enumerate(names):
        tb = b[p]
        acc.add(p, a[p], tb, permute_tensor(tb, spec.axes_to_perm[p], perm))
        if progress:
            progress("singular directions", i + 1, len(names))
    return acc.result()


def layer_barriers(
    curve: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], Any],
    a: Mapping[str, torch.Tensor],
    aligned: Mapping[str, torch.Tensor],
    layers: Sequence[str],
    progress: Progress | None = None,
) -> tuple[float, dict[str, float]]:
    """The aligned path's test loss barrier, and for each layer the barrier of the path that
    interpolates only that layer's tensors from A to pi(B), every other tensor kept at A's, over
    the same straight line between A's and pi(B)'s losses (so the layers' figures and the whole
    path's compare). ``curve(a, b)`` gives a path (an evaluator's curve at the run's alphas)."""
    base = {k: a[k] for k in a}
    whole = curve(base, aligned).to_dict()
    alphas, losses = whole["alphas"], whole["loss"]["test"]
    line = [(1 - t) * losses[0] + t * losses[-1] for t in alphas]
    out = {}
    for i, layer in enumerate(layers):
        hybrid = dict(base)
        for k in base:
            if layer_of(k) == layer:
                hybrid[k] = aligned[k]
        path = curve(base, hybrid).to_dict()["loss"]["test"]
        out[layer] = max(0.0, *(float(y - ref) for y, ref in zip(path, line, strict=True)))
        if progress:
            progress("barrier per layer", i + 1, len(layers))
    return max(0.0, *(float(y - ref) for y, ref in zip(losses, line, strict=True))), out


def diagnosis_report(
    rows: list[dict[str, Any]], barriers: tuple[float, Mapping[str, float]] | None, k: int
) -> dict[str, Any]:
    """The report's ``diagnosis`` section: per tensor and per layer."""
    layers: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = layers.setdefault(
            r["layer"], {"layer": r["layer"], "tensors": 0, "before": 0.0, "after": 0.0}
        )
        entry["tensors"] += 1
        entry["before"] += r["before"]["agreement"]
        entry["after"] += r["after"]["agreement"]
    for entry in layers.values():
        entry["before"] /= entry["tensors"]
        entry["after"] /= entry["tensors"]
        if barriers is not None:
            entry["barrier"] = barriers[1].get(entry["layer"])
    return {
        "measure": MEASURE,
        "k": k,
        "tensors": rows,
        "layers": list(layers.values()),
        "barrier": None
        if barriers is None
        else {
            "measure": "test loss above the line from A's to pi(B)'s loss, only that layer interpolated, "
            "the rest at A",
            "whole_path": barriers[0],
        },
    }
