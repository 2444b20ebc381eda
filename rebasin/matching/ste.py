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
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rebasin.core.types import Permutation, Progress
from rebasin.matching.adam import Adam
from rebasin.matching.assignment import resolve_backend, solve_groups
from rebasin.matching.projection import ImplicitSinkhorn, soft_permute
from rebasin.matching.result import GroupStats, MatchResult, float32_state, no_worse
from rebasin.matching.weight import weight_matching
from rebasin.permutation import identity, permute
from rebasin.spec.core import PermutationSpec

if TYPE_CHECKING:
    from rebasin.matching.methods import StraightThrough
    from rebasin.matching.registry import DataSide, MatchProblem

TaskLoss = Callable[[dict[str, torch.Tensor], int], torch.Tensor]
Score = Callable[[dict[str, torch.Tensor]], float]


OBJECTIVE = "midpoint loss (training data)"


def straight_through(
    opts: StraightThrough, problem: MatchProblem, data: DataSide, progress: Progress | None = None
) -> MatchResult:
    """Run the estimator with the options ``opts`` (see :class:`StraightThrough`): start from
    weight matching, take ``steps`` optimizer steps, evaluate the midpoint every ``eval_every``
    steps, and keep the best permutation seen (B as it is and the start included), so the
    result is never worse than either on the midpoint loss."""
    t0 = time.perf_counter()
    spec = problem.spec
    task_loss, score = data.task_loss(), data.score()
    steps = opts.steps if opts.epochs is None else opts.epochs * data.batches_per_epoch()
    dev = torch.device(problem.device)
    fa, fb = float32_state(problem.a, dev), float32_state(problem.b, dev)
    start = weight_matching(
        fa, fb, spec, seed=problem.seed, device=problem.device, backend=opts.backend, restarts=opts.restarts
    )
    perm: Permutation = {g: v.clone() for g, v in start.perm.items()}
    lr = opts.learning_rate
    if opts.estimator == "reinmax":
        step_fn = _reinmax_step(opts, fa, fb, spec, perm, task_loss)
        label, extra = "straight-through estimator (ReinMax)", {"tau": opts.tau}
    else:
        step_fn = _st_step(opts, problem.seed, fa, fb, spec, task_loss)
        label, extra = "straight-through estimator", {}

    def midpoint(p: Permutation) -> dict[str, torch.Tensor]:
        pb = permute(fb, spec, p)
        return {k: 0.5 * (fa[k] + pb[k]) for k in fb}

    at_identity = score(midpoint(identity(spec)))
    best_perm, best_score = perm, score(midpoint(perm))
    scores = [best_score]
    for step in range(steps):
        perm = step_fn(step, perm)
        if (step + 1) % opts.eval_every == 0 or step == steps - 1:
            s = score(midpoint(perm))
            scores.append(s)
            if s < best_score:
                best_perm, best_score = {g: v.clone() for g, v in perm.items()}, s
        if progress:
            progress(label, step + 1, steps)
    best_perm, best_score, kept_identity = no_worse(best_perm, best_score, identity(spec), at_identity)
    groups = {}
    for g, n in spec.sizes.items():
        moved = float((best_perm[g] != torch.arange(n)).float().mean())
        groups[g] = GroupStats(n, float("nan"), float("nan"), moved)
    return MatchResult(
        perm=best_perm,
        objective_identity=at_identity,
        objective=best_score,
        groups=groups,
        objective_name=OBJECTIVE,
        maximize=False,
        history=scores,
        converged=None,
        options={
            "steps": steps,
            "lr": lr,
            "seed": problem.seed,
            "estimator": opts.estimator,
            **extra,
            "eval_every": opts.eval_every,
            "midpoint_loss_start": scores[0],
            "midpoint_loss_best": best_score,
            "midpoint_loss_per_eval": scores,
            "kept_identity": kept_identity,
        },
        seconds=time.perf_counter() - t0,
    )


def _st_step(
    opts: StraightThrough,
    seed: int,
    fa: dict[str, torch.Tensor],
    fb: dict[str, torch.Tensor],
    spec: PermutationSpec,
    task_loss: TaskLoss,
) -> Callable[[int, Permutation], Permutation]:
    """One step of the paper's estimator: free weights, projected by weight matching."""
    free = {k: fa[k].clone().requires_grad_(True) for k in spec.params}
    opt = Adam(list(free.values()), lr=opts.learning_rate)

    def step_fn(step: int, perm: Permutation) -> Permutation:
        with torch.no_grad():
            target = {k: v.detach() for k, v in free.items()}
        perm = weight_matching(
            target,
            fb,
            spec,
            seed=seed,
            backend=opts.backend,
            max_iter=20,
            init=perm,
            device=str(fa[next(iter(fa))].device),
        ).perm
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
    opts: StraightThrough,
    fa: dict[str, torch.Tensor],
    fb: dict[str, torch.Tensor],
    spec: PermutationSpec,
    start: Permutation,
    task_loss: TaskLoss,
) -> Callable[[int, Permutation], Permutation]:
    """One ReinMax step on per-group permutation logits (see the module docstring)."""
    backend = resolve_backend(opts.backend)
    dev = next(iter(fa.values())).device
    # logits with the start permutation as a clear (not saturated) winner of every row
    logits = {}
    for g, n in sorted(spec.sizes.items()):
        w = torch.zeros(n, n, device=dev)
        w[torch.arange(n, device=dev), start[g].to(dev)] = 3.0 * opts.tau
        logits[g] = w.requires_grad_(True)
    opt = Adam(list(logits.values()), lr=opts.learning_rate)
    duals: dict[str, list[torch.Tensor]] = {g: [] for g in logits}

    def step_fn(step: int, _: Permutation) -> Permutation:
        hard = solve_groups({g: w.detach().double().cpu().numpy() for g, w in logits.items()}, spec, backend)
        perm, mats = {}, {}
        for g, w in logits.items():
            n = spec.sizes[g]
            perm[g] = torch.from_numpy(hard[g])
            d = torch.zeros(n, n, device=dev)
            d[torch.arange(n, device=dev), perm[g].to(dev)] = 1.0
            pi0 = ImplicitSinkhorn.apply(w / opts.tau, 100, 1e-6, duals[g])
            pi1_value = 0.5 * (d + pi0.detach())
            # value pi1, Sinkhorn Jacobian at pi1: the projection of log(pi1) is pi1 itself
            shift = (torch.log(pi1_value.clamp_min(1e-30)) - w.detach() / opts.tau).detach()
            pi1 = ImplicitSinkhorn.apply(shift + w / opts.tau, 100, 1e-6, None)
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
