"""Straight-through estimator (Ainsworth et al., "Git Re-Basin", ICLR 2023, section 3.3).

Learn free parameters theta (initialized to A) whose weight-matching projection onto B, pi(B),
makes the midpoint 0.5 (theta_A + pi(B)) a good model. Each step: pi = weight matching of theta to
B (warm-started from the last pi); forward the midpoint with theta_ste = pi(B) + (theta -
stopgrad(theta)) (the value of the projection, the gradient of theta); Adam on the task loss.
The permutation with the lowest evaluated midpoint loss is kept. Starts from weight matching.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from rebasin.matching.result import GroupStats, MatchResult, Permutation, Progress, float32_state
from rebasin.matching.weight import WeightMatching
from rebasin.permutation import permute
from rebasin.spec.core import PermutationSpec

TaskLoss = Callable[[dict[str, torch.Tensor], int], torch.Tensor]
Score = Callable[[dict[str, torch.Tensor]], float]


@dataclass(frozen=True)
class StraightThrough:
    """Configured straight-through estimator (``steps`` optimizer steps, ``eval_every`` steps
    between evaluations of the current permutation's midpoint with ``score``; the start is weight
    matching with ``restarts`` runs)."""

    steps: int = 200
    lr: float = 1e-3
    eval_every: int = 25
    restarts: int = 1
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"

    def match(
        self,
        a: Mapping[str, torch.Tensor],
        b: Mapping[str, torch.Tensor],
        spec: PermutationSpec,
        task_loss: TaskLoss,
        score: Score,
        progress: Progress | None = None,
    ) -> MatchResult:
        t0 = time.perf_counter()
        dev = torch.device(self.device)
        fa, fb = float32_state(a, dev), float32_state(b, dev)
        wm = WeightMatching(seed=self.seed, device=self.device, backend=self.backend, max_iter=20)
        start = WeightMatching(
            seed=self.seed, device=self.device, backend=self.backend, restarts=self.restarts
        ).match(fa, fb, spec)
        perm: Permutation = start.perm
        free = {k: fa[k].clone().requires_grad_(True) for k in spec.params}
        opt = torch.optim.Adam(list(free.values()), lr=self.lr)

        def midpoint(p: Permutation) -> dict[str, torch.Tensor]:
            pb = permute(fb, spec, p)
            return {k: 0.5 * (fa[k] + pb[k]) for k in fb}

        best_perm, best_score = perm, score(midpoint(perm))
        scores = [best_score]
        for step in range(self.steps):
            with torch.no_grad():
                target = {k: v.detach() for k, v in free.items()}
            perm = wm.match(target, fb, spec, init=perm).perm
            pb = permute(fb, spec, perm)
            params = {}
            for k in fb:
                ste = pb[k] + (free[k] - free[k].detach()) if k in free else pb[k]
                params[k] = 0.5 * (fa[k] + ste)
            loss = task_loss(params, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % self.eval_every == 0 or step == self.steps - 1:
                s = score(midpoint(perm))
                scores.append(s)
                if s < best_score:
                    best_perm, best_score = {g: v.clone() for g, v in perm.items()}, s
            if progress:
                progress("straight-through estimator", step + 1, self.steps)
        groups = {}
        for g, n in spec.sizes.items():
            moved = float((best_perm[g] != torch.arange(n)).float().mean())
            groups[g] = GroupStats(n, float("nan"), float("nan"), moved)
        return MatchResult(
            method="ste",
            perm=best_perm,
            objective_identity=float("nan"),
            objective=-best_score,
            groups=groups,
            options={
                "steps": self.steps,
                "lr": self.lr,
                "seed": self.seed,
                "eval_every": self.eval_every,
                "midpoint_loss_start": scores[0],
                "midpoint_loss_best": best_score,
                "midpoint_loss_per_eval": scores,
            },
            seconds=time.perf_counter() - t0,
        )
