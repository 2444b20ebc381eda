"""MergeMany (Ainsworth et al., "Git Re-Basin", ICLR 2023, Algorithm 3): align N models to a
common reference. Repeatedly, for each model in a seeded random order, weight-match it to the mean
of all the others (as currently aligned); stop when a full round changes no permutation or the
total distance to the mean stops falling."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rebasin.checkpoint import LazyStateDict
from rebasin.checkpoint.state import tensor_info
from rebasin.core.errors import MatchError
from rebasin.core.types import Permutation, Progress
from rebasin.matching.weight import weight_matching
from rebasin.permutation import permute
from rebasin.spec.core import PermutationSpec


@dataclass(frozen=True)
class ManyResult:
    """One permutation per model (model 0's may move too), and the distance history."""

    perms: list[Permutation]
    distance_before: float
    distance_after: float
    distance_per_round: list[float]
    rounds: int
    converged: bool
    seconds: float
    moved_fraction: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "distance_before": self.distance_before,
            "distance_after": self.distance_after,
            "distance_per_round": self.distance_per_round,
            "rounds": self.rounds,
            "converged": self.converged,
            "seconds": round(self.seconds, 4),
            "moved_fraction": self.moved_fraction,
        }


def _mean(states: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]) -> LazyStateDict:
    """The float32 mean of the states, lazily: one tensor at a time, on access."""

    def get(k: str) -> torch.Tensor:
        return torch.stack([s[k].float() for s in states]).mean(0)

    return LazyStateDict(list(keys), get)


def _distance(states: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]) -> float:
    """Sum over models of the L2 distance to the mean (one tensor of each model held at a time)."""
    squares = [0.0] * len(states)
    for k in keys:
        stack = torch.stack([s[k].float() for s in states])
        mean = stack.mean(0)
        for i in range(len(states)):
            squares[i] += float(((stack[i] - mean) ** 2).sum())
        del stack, mean
    return sum(math.sqrt(x) for x in squares)


NAME = "merge-many"
"""How reports, outputs and the command name the method."""


@dataclass(frozen=True)
class MergeMany:
    """Configured MergeMany solver (``max_rounds`` rounds over all models at most)."""

    max_rounds: int = 20
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"

    def match(
        self,
        states: Sequence[Mapping[str, torch.Tensor]],
        spec: PermutationSpec,
        progress: Progress | None = None,
    ) -> ManyResult:
        if len(states) < 2:
            raise MatchError("merge-many needs at least two models")
        t0 = time.perf_counter()
        keys = [k for k in states[0] if tensor_info(states[0], k).dtype.is_floating_point]
        touched = spec.params
        base = list(states)  # read as stored, a tensor at a time: never whole models in float32
        perms: list[Permutation] = [{g: torch.arange(n) for g, n in spec.sizes.items()} for _ in states]
        aligned = [permute(s, spec, p) for s, p in zip(base, perms, strict=True)]
        history = [_distance(aligned, keys)]
        rng = np.random.default_rng([self.seed, 7])
        converged = False
        rounds = 0
        best = (history[0], [dict(p) for p in perms])
        for rounds in range(1, self.max_rounds + 1):
            changed = False
            for i in rng.permutation(len(states)):
                others = [aligned[j] for j in range(len(states)) if j != i]
                target = _mean(others, touched)
                r = weight_matching(
                    target, base[i], spec, seed=self.seed, device=self.device, backend=self.backend
                )
                if any(not torch.equal(r.perm[g], perms[i][g]) for g in spec.sizes):
                    changed = True
                    perms[i] = r.perm
                    aligned[i] = permute(base[i], spec, r.perm)
            history.append(_distance(aligned, keys))
            if history[-1] < best[0]:
                best = (history[-1], [dict(p) for p in perms])
            if progress:
                progress("merge-many", rounds, self.max_rounds)
            if not changed or history[-1] >= history[-2] - 1e-9 * abs(history[-2]):
                converged = True
                break
        perms = best[1]  # the lowest total distance seen
        moved = [
            {g: float((p[g] != torch.arange(len(p[g]))).float().mean()) for g in spec.sizes} for p in perms
        ]
        return ManyResult(
            perms, history[0], best[0], history, rounds, converged, time.perf_counter() - t0, moved
        )
