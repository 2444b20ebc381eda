"""Straight-through estimator (Ainsworth et al., "Git Re-Basin", ICLR 2023, section 3.3).

Learn free parameters theta (initialized to A) whose weight-matching projection onto B, pi(B),
makes the midpoint 0.5 (theta_A + pi(B)) a good model. Each step: pi = weight matching of theta to
B (warm-started from the last pi); forward the midpoint with theta_ste = pi(B) + (theta -
stopgrad(theta)) (the value of the projection, the gradient of theta); Adam on the task loss.
The permutation with the lowest evaluated midpoint loss is kept. Starts from weight matching.

``estimator="reinmax"`` replaces the first-order straight-through gradient by ReinMax (Liu et al.,
"Bridging Discrete and Backpropagation: Straight-Through and Beyond", NeurIPS 2023). ReinMax needs
a soft distribution next to the hard sample, so this estimator learns per-group permutation logits
W instead of free weights: the hard permutation D is the assignment maximizing W, the soft one is
pi0 = Sinkhorn(W) (the doubly-stochastic analogue of softmax), and the forward pass applies D while
the gradient is that of ``2 pi1 - pi0 / 2`` with ``pi1 = (D + pi0) / 2`` carrying the Sinkhorn
Jacobian taken at pi1 (Heun's second-order step, as in the paper's categorical case). The logits
start at the weight-matching permutation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from rebasin.errors import ConfigError
from rebasin.matching.assignment import resolve_backend, solve_groups
from rebasin.matching.result import GroupStats, MatchResult, Permutation, Progress, float32_state
from rebasin.matching.sinkhorn import ImplicitSinkhorn, soft_permute
from rebasin.matching.weight import WeightMatching
from rebasin.permutation import permute
from rebasin.spec.core import PermutationSpec

TaskLoss = Callable[[dict[str, torch.Tensor], int], torch.Tensor]
Score = Callable[[dict[str, torch.Tensor]], float]
ESTIMATORS = ("st", "reinmax")


@dataclass(frozen=True)
class StraightThrough:
    """Configured straight-through estimator (``steps`` optimizer steps, ``eval_every`` steps
    between evaluations of the current permutation's midpoint with ``score``; the start is weight
    matching with ``restarts`` runs). ``estimator``: ``st`` (free weights, the paper's STE) or
    ``reinmax`` (permutation logits with the ReinMax gradient; ``tau`` is its Sinkhorn temperature)."""

    steps: int = 200
    lr: float | None = None
    eval_every: int = 25
    restarts: int = 1
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    estimator: str = "st"
    tau: float = 1.0

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
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown estimator '{self.estimator}' (choose from {', '.join(ESTIMATORS)})")
        dev = torch.device(self.device)
        fa, fb = float32_state(a, dev), float32_state(b, dev)
        start = WeightMatching(
            seed=self.seed, device=self.device, backend=self.backend, restarts=self.restarts
        ).match(fa, fb, spec)
        perm: Permutation = {g: v.clone() for g, v in start.perm.items()}
        if self.estimator == "reinmax":
            step_fn, lr = self._reinmax_step(fa, fb, spec, perm, task_loss), self.lr or 0.1
            label, extra = "straight-through estimator (ReinMax)", {"tau": self.tau}
        else:
            step_fn, lr = self._st_step(fa, fb, spec, task_loss), self.lr or 1e-3
            label, extra = "straight-through estimator", {}

        def midpoint(p: Permutation) -> dict[str, torch.Tensor]:
            pb = permute(fb, spec, p)
            return {k: 0.5 * (fa[k] + pb[k]) for k in fb}

        best_perm, best_score = perm, score(midpoint(perm))
        scores = [best_score]
        for step in range(self.steps):
            perm = step_fn(step, perm)
            if (step + 1) % self.eval_every == 0 or step == self.steps - 1:
                s = score(midpoint(perm))
                scores.append(s)
                if s < best_score:
                    best_perm, best_score = {g: v.clone() for g, v in perm.items()}, s
            if progress:
                progress(label, step + 1, self.steps)
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
                "lr": lr,
                "seed": self.seed,
                "estimator": self.estimator,
                **extra,
                "eval_every": self.eval_every,
                "midpoint_loss_start": scores[0],
                "midpoint_loss_best": best_score,
                "midpoint_loss_per_eval": scores,
            },
            seconds=time.perf_counter() - t0,
        )

    def _st_step(
        self,
        fa: dict[str, torch.Tensor],
        fb: dict[str, torch.Tensor],
        spec: PermutationSpec,
        task_loss: TaskLoss,
    ) -> Callable[[int, Permutation], Permutation]:
        """One step of the paper's estimator: free weights, projected by weight matching."""
        wm = WeightMatching(seed=self.seed, device=self.device, backend=self.backend, max_iter=20)
        free = {k: fa[k].clone().requires_grad_(True) for k in spec.params}
        opt = torch.optim.Adam(list(free.values()), lr=self.lr or 1e-3)

        def step_fn(step: int, perm: Permutation) -> Permutation:
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
            return perm

        return step_fn

    def _reinmax_step(
        self,
        fa: dict[str, torch.Tensor],
        fb: dict[str, torch.Tensor],
        spec: PermutationSpec,
        start: Permutation,
        task_loss: TaskLoss,
    ) -> Callable[[int, Permutation], Permutation]:
        """One ReinMax step on per-group permutation logits (see the module docstring)."""
        backend = resolve_backend(self.backend)
        dev = next(iter(fa.values())).device
        # logits with the start permutation as a clear (not saturated) winner of every row
        logits = {}
        for g, n in sorted(spec.sizes.items()):
            w = torch.zeros(n, n, device=dev)
            w[torch.arange(n, device=dev), start[g].to(dev)] = 3.0 * self.tau
            logits[g] = w.requires_grad_(True)
        opt = torch.optim.Adam(list(logits.values()), lr=self.lr or 0.1)
        duals: dict[str, list[torch.Tensor]] = {g: [] for g in logits}

        def step_fn(step: int, _: Permutation) -> Permutation:
            hard = solve_groups(
                {g: w.detach().double().cpu().numpy() for g, w in logits.items()}, spec, backend
            )
            perm, mats = {}, {}
            for g, w in logits.items():
                n = spec.sizes[g]
                perm[g] = torch.from_numpy(hard[g])
                d = torch.zeros(n, n, device=dev)
                d[torch.arange(n, device=dev), perm[g].to(dev)] = 1.0
                pi0 = ImplicitSinkhorn.apply(w / self.tau, 100, 1e-6, duals[g])
                pi1_value = 0.5 * (d + pi0.detach())
                # value pi1, Sinkhorn Jacobian at pi1: the projection of log(pi1) is pi1 itself
                shift = (torch.log(pi1_value.clamp_min(1e-30)) - w.detach() / self.tau).detach()
                pi1 = ImplicitSinkhorn.apply(shift + w / self.tau, 100, 1e-6, None)
                pi2 = 2.0 * pi1 - 0.5 * pi0
                mats[g] = d + pi2 - pi2.detach()
            params = {}
            for k in fb:
                pb = soft_permute(fb[k], spec.axes_to_perm[k], mats) if k in spec.axes_to_perm else fb[k]
                params[k] = 0.5 * (fa[k] + pb)
            loss = task_loss(params, step)
            opt.zero_grad()
            if bool(torch.isfinite(loss.detach())):
                loss.backward()
                opt.step()
            return perm

        return step_fn
