"""Activation matching (Ainsworth et al., "Git Re-Basin", ICLR 2023, section 3.1).

Run A and B on the same inputs, correlate each group's hidden units (Pearson correlation, streamed
in float64: no activations are kept), and solve one assignment per group. Groups are independent.
All taps of a group (e.g. every block writing into a residual stream) pool their statistics.

The matcher runs nothing itself: it receives ``features(state)``, an iterator over batches that
yields, per group, the list of that group's tap activations as (rows, units) matrices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from rebasin.core.errors import MatchError
from rebasin.core.types import Progress
from rebasin.matching.assignment import resolve_backend, solve_groups
from rebasin.matching.result import GroupStats, MatchResult
from rebasin.matching.weight import weight_matching
from rebasin.permutation import permute
from rebasin.spec.core import PermutationSpec

Features = Callable[[Mapping[str, torch.Tensor]], Iterable[dict[str, list[torch.Tensor]]]]


class _Moments:
    """Streaming first and second moments of two aligned activation matrices."""

    def __init__(self, n: int):
        z = torch.zeros
        self.count = 0
        self.sa, self.sb = z(n, dtype=torch.float64), z(n, dtype=torch.float64)
        self.saa, self.sbb = z(n, dtype=torch.float64), z(n, dtype=torch.float64)
        self.sab = z(n, n, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self, eps: float = 1e-12) -> np.ndarray:
        n = self.count
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - torch.outer(ma, mb)
        sa = (self.saa / n - ma * ma).clamp_min(0).sqrt()
        sb = (self.sbb / n - mb * mb).clamp_min(0).sqrt()
        return (cov / (torch.outer(sa, sb) + eps)).numpy()


OBJECTIVE = "summed correlation of matched units"


def correlations(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    features: Features,
    progress: Progress | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Per group, the Pearson correlation of A's units (rows) with B's (columns) over the data,
    and the number of batches; groups no module outputs are absent."""
    moments = {g: _Moments(n) for g, n in spec.sizes.items()}
    batches = 0
    for fa, fb in zip(features(a), features(b), strict=True):
        for g, taps_a in fa.items():
            if g not in moments:
                continue
            for ta, tb in zip(taps_a, fb[g], strict=True):
                if ta.shape != tb.shape or ta.shape[-1] != spec.sizes[g]:
                    raise MatchError(f"activations of group '{g}' have shape {tuple(ta.shape)}")
                moments[g].add(ta, tb)
        batches += 1
        if progress:
            progress("collecting activations", batches, batches)
    return {g: m.correlation() for g, m in moments.items() if m.count}, batches


def activation_matching(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    features: Features,
    backend: str = "auto",
    progress: Progress | None = None,
) -> MatchResult:
    """Permutation of ``b``'s units maximizing their correlation with ``a``'s, per group."""
    t0 = time.perf_counter()
    costs, batches = correlations(a, b, spec, features, progress)
    return assign_correlations(a, b, spec, costs, backend, {"batches": batches}, t0)


def assign_correlations(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    costs: Mapping[str, np.ndarray],
    backend: str = "auto",
    options: Mapping[str, object] | None = None,
    t0: float | None = None,
) -> MatchResult:
    """The permutation that maximizes each group's summed correlation (one assignment per
    group); a unit (tied head groups) is activation-matched only when every group in it has
    correlations, the rest by weight matching with the matched groups held."""
    backend = resolve_backend(backend)
    t0 = time.perf_counter() if t0 is None else t0
    missing = {g for g in spec.sizes if g not in costs}
    by_weights = {g for unit in spec.units if not missing.isdisjoint(unit) for g in unit}
    if len(by_weights) == len(spec.sizes):
        raise MatchError(
            "no activations were recorded for any group (no module outputs them): "
            "use --method weight, sinkhorn or ste"
        )
    perm, groups = {}, {}
    costs = {g: c for g, c in costs.items() if g not in by_weights}
    solved = solve_groups(costs, spec, backend)
    for g, c in costs.items():
        p = solved[g]
        n = spec.sizes[g]
        perm[g] = torch.from_numpy(p)
        groups[g] = GroupStats(
            size=n,
            objective_before=float(np.trace(c)),
            objective_after=float(c[np.arange(n), p].sum()),
            moved_fraction=float((p != np.arange(n)).mean()),
        )
    if by_weights:  # groups no module outputs (attention heads): weight matching, the rest held
        rest = spec.without(costs)
        wm = weight_matching(a, permute(b, spec, perm), rest, backend=backend)
        perm.update(wm.perm)
        groups.update(wm.groups)
    return MatchResult(
        perm=perm,
        objective_identity=sum(s.objective_before for s in groups.values()),
        objective=sum(s.objective_after for s in groups.values()),
        groups=groups,
        objective_name=OBJECTIVE,
        maximize=True,
        options={"backend": backend, **(options or {}), "weight_matched": sorted(by_weights)},
        seconds=time.perf_counter() - t0,
    )
