"""``--method auto``: run the methods that fit a time budget and keep the best, judged as the
barrier will judge it.

With data, the candidates are: no alignment, weight matching (with restarts when they fit),
activation matching, and the data costs (straight-through estimator, Sinkhorn's midpoint cost)
while the estimates of their time (from operation counts, never clocks: the same choice on every
machine) fit the budget. Each candidate's permutation is scored by the midpoint loss on training
data (BatchNorm statistics taken from the data on nets with BatchNorm, as the barrier is
measured), and the lowest wins. Without data, it is weight matching with up to three runs (while
their estimated time fits the budget), keeping the highest objective.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from rebasin.checkpoint.state import shape_of
from rebasin.core.types import Permutation, Progress
from rebasin.matching.costs import sweep_products
from rebasin.matching.registry import MATCHERS
from rebasin.matching.result import GroupStats, MatchResult, float32_state
from rebasin.permutation import identity, permute, random_permutation

if TYPE_CHECKING:
    from rebasin.matching.methods import AutoMatch, WeightMatching
    from rebasin.matching.registry import DataSide, Matcher, MatchProblem

OBJECTIVE = "midpoint loss (training data)"
RESTARTS = 3


def auto_match(
    opts: AutoMatch, base: WeightMatching, problem: MatchProblem, progress: Progress | None = None
) -> MatchResult:
    """Run the candidates of ``opts`` (see :class:`AutoMatch`) on ``problem``, starting with
    ``base``'s runs (the result without data); keep the best."""
    t0 = time.perf_counter()
    run_seconds = _seconds(base.auto_flops(sweep_flops(problem), 0.0), problem.device)
    runs = [base.run(problem)]
    while len(runs) < RESTARTS and (len(runs) + 1) * run_seconds <= opts.budget:
        init = random_permutation(problem.spec, problem.seed * 7919 + len(runs))
        runs.append(base.run(problem, init))
    if problem.data is None:  # the highest objective: the only criterion there is
        return _best_run(runs, base.name, time.perf_counter() - t0)
    return _with_data(opts, problem, problem.data, runs, t0, progress)


def _best_run(runs: list[MatchResult], name: str, seconds: float) -> MatchResult:
    """The run with the highest objective, reporting every run as a restart."""
    best = max(range(len(runs)), key=lambda i: (runs[i].objective, -i))
    r = runs[best]
    reason = f"no data: {name} matching, best objective of {len(runs)} run(s)"
    options = {**r.options, "restarts": len(runs), "auto": reason, "chosen": name}
    traces = [t for run in runs for t in run.restarts]
    return dataclasses.replace(
        r,
        options=options,
        seconds=seconds,
        restarts=traces,
        best_restart=best if len(traces) == len(runs) else 0,
    )


def _with_data(
    opts: AutoMatch,
    problem: MatchProblem,
    data: DataSide,
    runs: list[MatchResult],
    t0: float,
    progress: Progress | None,
) -> MatchResult:

    spec, dev = problem.spec, torch.device(problem.device)
    fa, fb = float32_state(problem.a, dev), float32_state(problem.b, dev)
    score = data.score()

    def midpoint_loss(p: Permutation) -> float:
        pb = permute(fb, spec, p)
        return score({k: 0.5 * (fa[k] + pb[k]) for k in fb})

    rows: list[dict[str, Any]] = []
    perms: list[Permutation] = []
    found: list[MatchResult | None] = []

    def consider(name: str, perm: Permutation, seconds: float, result: MatchResult | None = None) -> None:
        rows.append({"method": name, "score": midpoint_loss(perm), "seconds": round(seconds, 4)})
        perms.append(perm)
        found.append(result)
        if progress:
            progress(f"auto: {name}", len(rows), len(runs) + 4)

    consider("none", identity(spec), 0.0)
    for i, r in enumerate(runs):  # each run on its own: the highest objective is not the lowest loss
        consider("weight" if i == 0 else f"weight (random start {i})", r.perm, r.seconds, r)
    candidates: list[Matcher] = [
        cls(backend=opts.backend, **variant) for cls in MATCHERS.values() for variant in cls.auto_variants
    ]
    costs: dict[int, float] = {}
    if any(m.auto_flops(1.0, 1.0) is not None for m in candidates):  # counted only when asked
        loss, sweep = _loss_flops(data, fa), sweep_flops(problem)
        costs = {
            i: _seconds(f, problem.device)
            for i, m in enumerate(candidates)
            if (f := m.auto_flops(sweep, loss)) is not None
        }
    slow: list[str] = []
    spent = 0.0
    for i, matcher in enumerate(candidates):  # the cheap ones always; the rest while they fit
        name = matcher.describe()
        if i in costs:
            if spent + costs[i] > opts.budget:
                slow.append(f"{name} (estimated {costs[i]:.0f} s)")
                continue
            spent += costs[i]
        r = matcher.match(problem)
        consider(name, r.perm, r.seconds, r)
    best = min(range(len(rows)), key=lambda i: (rows[i]["score"], i))
    for i, row in enumerate(rows):
        row["chosen"] = i == best
    perm, chosen = perms[best], found[best]
    groups = (
        chosen.groups
        if chosen is not None
        else {  # the winner's own per-group figures
            g: GroupStats(n, float("nan"), float("nan"), 0.0) for g, n in spec.sizes.items()
        }
    )
    return MatchResult(
        perm=perm,
        objective_identity=rows[0]["score"],
        objective=rows[best]["score"],
        groups=groups,
        objective_name=OBJECTIVE,
        maximize=False,
        history=[r["score"] for r in rows],
        converged=None,
        options={
            "budget": opts.budget,
            "seed": problem.seed,
            "chosen": rows[best]["method"],
            "candidates": rows,
            "skipped": slow,
            "kept_identity": best == 0,
        },
        seconds=time.perf_counter() - t0,
    )


NOMINAL_FLOPS = {"cpu": 2e10, "cuda": 2e12}
"""Floating-point operations per second assumed when estimating a candidate's time. Estimates
come from operation counts, never from clocks, so the candidates run (and the result) are the
same on every run and machine for a given seed and budget."""


def planned_candidates_flops(opts: AutoMatch, sweep: float, loss: float, device: str = "cpu") -> float:
    """Operations of the data candidates ``opts`` would run, chosen as :func:`auto_match` chooses
    them (by nominal seconds within the budget), for ``--dry-run``'s estimate."""
    spent = 0.0
    for cls in MATCHERS.values():
        for variant in cls.auto_variants:
            f = cls(backend=opts.backend, **variant).auto_flops(sweep, loss)
            if f is not None and spent + _seconds(f, device) <= opts.budget:
                spent += _seconds(f, device)
    return spent * NOMINAL_FLOPS["cuda" if device.startswith("cuda") else "cpu"]


def _seconds(flops: float, device: str) -> float:
    return flops / NOMINAL_FLOPS["cuda" if device.startswith("cuda") else "cpu"]


def sweep_flops(problem: MatchProblem) -> float:
    """Operations of one weight-matching sweep: every member's cost-matrix product."""

    weighed = problem.cost_params
    return sweep_products(problem.spec, {k: shape_of(problem.a, k) for k in weighed}, weighed)


def _loss_flops(data: DataSide, fa: dict[str, torch.Tensor]) -> float:
    """Operations of one optimizer step's task loss (forward and backward), counted."""

    task_loss: Callable[[dict[str, torch.Tensor], int], torch.Tensor] = data.task_loss()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in fa.items()}
    with FlopCounterMode(display=False) as counter:
        task_loss(params, 0).backward()
    return float(counter.get_total_flops())
