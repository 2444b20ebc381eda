"""Sinkhorn re-basin (Pena, Medeiros, Dubois, Bengio, Trassard, "Re-basin via implicit Sinkhorn
differentiation", CVPR 2023).

Each group gets a real n x n matrix W; its soft permutation is the Sinkhorn projection of W / tau
(log domain, to convergence) onto the doubly-stochastic matrices. A cost of the softly permuted B
is minimized by Adam while tau anneals geometrically; gradients flow through the Sinkhorn fixed
point by implicit differentiation (no unrolled iterations). The hard permutation is the linear
assignment maximizing W. Costs: ``l2`` (distance between A and the permuted B, data-free),
``mid`` (task loss of the midpoint model) and ``rnd`` (task loss at a random lambda), the last two
through a ``task_loss`` callable supplied by the caller.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from rebasin.core.errors import ConfigError
from rebasin.core.types import Permutation, Progress
from rebasin.matching.adam import Adam
from rebasin.matching.assignment import resolve_backend, solve_groups
from rebasin.matching.projection import ImplicitSinkhorn, no_denormals, soft_permute
from rebasin.matching.result import GroupStats, MatchResult, float32_state, no_worse
from rebasin.permutation import identity, permute

if TYPE_CHECKING:
    from rebasin.matching.methods import SinkhornRebasin
    from rebasin.matching.registry import DataSide, MatchProblem

TaskLoss = Callable[[dict[str, torch.Tensor], int], torch.Tensor]
"""task_loss(params, step) -> scalar loss of a model with these parameters on the step's batch."""

PROJECTION_TOL = 1e-4
"""Row-sum tolerance of each step's projection (and relative residual of its implicit gradient)."""


def sinkhorn_rebasin(
    opts: SinkhornRebasin, problem: MatchProblem, data: DataSide | None, progress: Progress | None = None
) -> MatchResult:
    """Run Sinkhorn re-basin with the options ``opts`` (see :class:`SinkhornRebasin`). The data
    costs (``mid``, ``rnd``) need ``data``. The result never ends worse than B as it is on the
    method's criterion (distance for ``l2``, midpoint loss on training data otherwise): if the
    found permutation is worse, the identity is kept."""
    with no_denormals():
        return _sinkhorn_rebasin(opts, problem, data, progress)


def _sinkhorn_rebasin(
    opts: SinkhornRebasin, problem: MatchProblem, data: DataSide | None, progress: Progress | None
) -> MatchResult:
    a, b, spec = problem.a, problem.b, problem.spec
    task_loss = data.task_loss() if data is not None else None
    if opts.cost != "l2" and task_loss is None:
        raise ConfigError(f"Sinkhorn cost '{opts.cost}' needs data: pass --data (and a model, --model)")
    steps = opts.step_count
    if opts.epochs is not None and data is not None:
        steps = opts.epochs * data.batches_per_epoch()
    backend = resolve_backend(opts.backend)
    t0 = time.perf_counter()
    dev = torch.device(problem.device)
    gen = torch.Generator().manual_seed(problem.seed)
    fa, fb = float32_state(a, dev), float32_state(b, dev)
    weighed = problem.cost_params
    buckets: dict[int, list[str]] = {}  # groups of one size are projected as one stack
    for g, n in sorted(spec.sizes.items()):
        buckets.setdefault(n, []).append(g)
    logits = {}
    for n, names in buckets.items():
        eye = torch.eye(n) * (1.0 if opts.init == "identity" else 0.0)
        w = torch.stack([eye + 0.01 * torch.randn(n, n, generator=gen) for _ in names])
        logits[n] = w.to(dev).requires_grad_(True)
    opt = Adam(list(logits.values()), lr=opts.lr)
    duals: dict[int, list[torch.Tensor]] = {n: [] for n in logits}
    scale = sum(float((fa[k] ** 2).sum()) for k in weighed) or 1.0
    history = []
    ratio = (opts.tau_end / opts.tau_start) ** (1 / max(1, steps - 1))
    for step in range(steps):
        tau = opts.tau_start * ratio**step
        soft = {}
        for n, w in logits.items():
            if step:  # the potentials scale with 1 / tau: a closer warm start
                duals[n][:] = [d / ratio for d in duals[n]]
            stack = ImplicitSinkhorn.apply(w / tau, opts.sinkhorn_iters, PROJECTION_TOL, duals[n])
            soft.update({g: stack[i] for i, g in enumerate(buckets[n])})
        if opts.cost == "l2":
            loss = (
                torch.stack(
                    [((fa[k] - soft_permute(fb[k], spec.axes_to_perm[k], soft)) ** 2).sum() for k in weighed]
                ).sum()
                / scale
            )
        else:
            assert task_loss is not None
            pb = {
                k: soft_permute(fb[k], spec.axes_to_perm[k], soft) if k in spec.axes_to_perm else fb[k]
                for k in fb
            }
            lam = 0.5 if opts.cost == "mid" else float(torch.rand((), generator=gen))
            params = {k: (1 - lam) * fa[k] + lam * pb[k] for k in fb}
            loss = task_loss(params, step)
        opt.zero_grad()
        if not bool(torch.isfinite(loss.detach())):
            continue  # a diverging batch: skip it rather than poison the logits
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if progress and (step % 10 == 0 or step == steps - 1):
            progress(f"sinkhorn ({opts.cost})", step + 1, steps)
    perm, groups = {}, {}
    costs = {
        g: w[i].detach().double().cpu().numpy() for n, w in logits.items() for i, g in enumerate(buckets[n])
    }
    solved = solve_groups(costs, spec, backend)
    for g, c in costs.items():
        p = solved[g]
        perm[g] = torch.from_numpy(p)
        n = spec.sizes[g]
        groups[g] = GroupStats(
            n, float(np.trace(c)), float(c[np.arange(n), p].sum()), float((p != np.arange(n)).mean())
        )

    if opts.cost == "l2":
        name = "||A - pi(B)||"

        def criterion(p: Permutation) -> float:
            hard = permute({k: fb[k] for k in weighed}, spec, p)
            return math.sqrt(sum(float(((fa[k] - hard[k]) ** 2).sum()) for k in weighed))

    else:
        assert data is not None
        name, score = "midpoint loss (training data)", data.score()

        def criterion(p: Permutation) -> float:
            pb = permute(fb, spec, p)
            return score({k: 0.5 * (fa[k] + pb[k]) for k in fb})

    ident = identity(spec)
    at_identity, found = criterion(ident), criterion(perm)
    perm, found, kept_identity = no_worse(perm, found, ident, at_identity)
    return MatchResult(
        perm=perm,
        objective_identity=at_identity,
        objective=found,
        groups=groups,
        objective_name=name,
        maximize=False,
        history=history,
        converged=None,
        options={
            "cost": opts.cost,
            "steps": steps,
            "lr": opts.lr,
            "tau_start": opts.tau_start,
            "tau_end": opts.tau_end,
            "seed": problem.seed,
            "backend": backend,
            "loss_first": history[0] if history else None,
            "loss_last": history[-1] if history else None,
            "kept_identity": kept_identity,
        },
        seconds=time.perf_counter() - t0,
    )
