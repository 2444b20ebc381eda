"""Weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023, Algorithm 1).

Maximize ``sum_params <A, pi(B)>`` by coordinate descent: for one group, with every other group
held fixed, the objective is linear in that group's permutation, so one exact linear assignment
solves it. Groups are visited in a seeded random order; a sweep that improves nothing ends the run.
A group is skipped when none of its neighbours changed since it was last solved (its cost matrix is
then unchanged and its permutation already optimal).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping

import numpy as np
import torch

from rebasin.errors import MatchError
from rebasin.matching.assignment import resolve_backend, solve_unit
from rebasin.matching.result import GroupStats, MatchResult, Permutation, Progress, RestartTrace
from rebasin.permutation import permute_tensor, random_permutation
from rebasin.spec.core import Member, PermutationSpec

OBJECTIVE = "<A, pi(B)>"


def weight_matching(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    max_iter: int = 100,
    restarts: int = 1,
    seed: int = 0,
    device: str = "cpu",
    backend: str = "auto",
    tol: float = 1e-12,
    init: Permutation | None = None,
    progress: Progress | None = None,
    buffers: Collection[str] = (),
) -> MatchResult:
    """Find the permutation of ``b`` that aligns it with ``a`` (the options are those of
    :class:`rebasin.matching.methods.WeightMatching`; ``init`` starts run 0 there).

    Run 0 starts at the identity (or ``init``), later runs at a random permutation; the run with
    the highest objective wins. Runs are reproducible from ``seed``. The objective sums over the
    spec's parameters only: running statistics and ``buffers`` are permuted with their groups but
    carry no weight (:meth:`PermutationSpec.cost_params`)."""
    if max_iter < 1 or restarts < 1:
        raise MatchError("max_iter and restarts must be at least 1")
    backend = resolve_backend(backend)
    t0 = time.perf_counter()
    problem = _Problem(a, b, spec, torch.device(device), buffers)
    best: tuple[float, Permutation] | None = None
    traces: list[RestartTrace] = []
    best_k = 0
    for k in range(restarts):
        run_seed = [int(seed), k]
        rng = np.random.default_rng(run_seed)
        if init is not None and k == 0:
            start, how = {g: v.clone() for g, v in init.items()}, "given"
        elif k == 0:
            start, how = {g: torch.arange(n) for g, n in spec.sizes.items()}, "identity"
        else:
            start = random_permutation(spec, int(rng.integers(2**62)))
            how = "random"
        label = f"weight matching (run {k + 1}/{restarts}"
        perm, trace = _descend(problem, start, rng, backend, max_iter, tol, progress, label, k, restarts)
        traces.append(RestartTrace(run_seed, how, *trace))
        if best is None or trace[0] > best[0]:
            best, best_k = (trace[0], perm), k
    assert best is not None
    perm = best[1]
    groups = {}
    for g in spec.sizes:
        c = problem.cost(g, perm)
        n = spec.sizes[g]
        groups[g] = GroupStats(
            size=n,
            objective_before=float(np.trace(c)),
            objective_after=float(c[np.arange(n), perm[g].numpy()].sum()),
            moved_fraction=float((perm[g] != torch.arange(n)).float().mean()),
        )
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    return MatchResult(
        method="weight",
        perm=perm,
        objective_identity=problem.objective(ident),
        objective=best[0],
        groups=groups,
        objective_name=OBJECTIVE,
        maximize=True,
        history=traces[best_k].objective_per_sweep,
        converged=traces[best_k].converged,
        restarts=traces,
        best_restart=best_k,
        options={
            "max_iter": max_iter,
            "restarts": restarts,
            "seed": seed,
            "device": device,
            "backend": backend,
        },
        seconds=time.perf_counter() - t0,
    )


def _descend(
    problem: _Problem,
    perm: Permutation,
    rng: np.random.Generator,
    backend: str,
    max_iter: int,
    tol: float,
    progress: Progress | None,
    label: str,
    k: int,
    restarts: int,
) -> tuple[Permutation, tuple[float, int, bool, list[float]]]:
    spec = problem.spec
    units = spec.units
    names = sorted(spec.sizes)
    history = [problem.objective(perm)]  # exact (float64) at the end of every sweep
    dirty = set(names)  # groups whose cost may have changed since last solved
    converged = False
    sweep = 0
    for sweep in range(1, max_iter + 1):
        improved = False
        start = {g: v.clone() for g, v in perm.items()}
        for u in rng.permutation(len(units)):
            unit = units[int(u)]
            if dirty.isdisjoint(unit):
                continue
            dirty.difference_update(unit)
            costs = {g: problem.cost(g, perm) for g in unit}
            new = solve_unit(costs, spec.heads, backend)
            old_val = new_val = 0.0
            for g, c in costs.items():
                rows = np.arange(spec.sizes[g])
                old_val += float(c[rows, perm[g].numpy()].sum())
                new_val += float(c[rows, new[g]].sum())
            if new_val > old_val + tol * max(1.0, abs(old_val)):
                for g in unit:
                    perm[g] = torch.from_numpy(new[g])
                    dirty |= spec.neighbours[g]
                improved = True
        if progress:
            progress(f"{label}, sweep {sweep})", k + 1 - 1 / (sweep + 1), restarts)
        value = problem.objective(perm) if improved else history[-1]
        if value <= history[-1]:
            # nothing moved, or gains below the float32 products' rounding: the exact objective
            # did not rise, so the sweep's moves are undone and the run has converged
            perm = start
            history.append(history[-1])
            converged = True
            break
        history.append(value)
    return perm, (history[-1], sweep, converged, history)


class _Problem:
    """A and B's weighed tensors upcast to float32 on the device, with A's member matrices cached."""

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
        self.a = {p: a[p].to(device=device, dtype=torch.float32) for p in weighed}
        self.b = {p: b[p].to(device=device, dtype=torch.float32) for p in weighed}
        self.members = {g: [m for m in ms if m.param in self.a] for g, ms in spec.groups.items()}
        self.a_mats: dict[Member, torch.Tensor] = {}
        self.fixed_products: dict[Member, torch.Tensor] = {}  # members whose B side never changes
        for g, members in self.members.items():
            for m in members:
                self.a_mats[m] = _unit_rows(self.a[m.param], m, spec.sizes[g])

    def cost(self, g: str, perm: Permutation) -> np.ndarray:
        """``C[i, j] = <A unit i, B unit j>`` summed over the group's members (others applied)."""
        n = self.spec.sizes[g]
        c = torch.zeros(n, n, dtype=torch.float32, device=self.device)
        for m in self.members[g]:
            if m in self.fixed_products:
                c += self.fixed_products[m]
                continue
            entries = self.spec.axes_to_perm[m.param]
            bt = permute_tensor(self.b[m.param], entries, perm, skip=g)
            prod = self.a_mats[m] @ _unit_rows(bt, m, n).T
            if all(e is None for i, e in enumerate(entries) if i != m.axis):
                self.fixed_products[m] = prod  # no other group touches it: the same every time
            c += prod
        out = c.double().cpu().numpy()
        if not np.isfinite(out).all():
            raise MatchError(f"cost matrix of group '{g}' is not finite (weights too large?)")
        return out

    def objective(self, perm: Permutation) -> float:
        """``sum_params <A, pi(B)>`` over the weighed parameters, accumulated in float64."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p, bt in self.b.items():
            x = self.a[p].reshape(-1)
            y = permute_tensor(bt, self.spec.axes_to_perm[p], perm).reshape(-1)
            for i in range(0, x.numel(), _CHUNK):  # float64 a block at a time: bounded memory
                total += torch.dot(x[i : i + _CHUNK].double(), y[i : i + _CHUNK].double())
        return float(total)


_CHUNK = 1 << 22


def _unit_rows(t: torch.Tensor, m: Member, n: int) -> torch.Tensor:
    """View ``t`` as one row per unit of the member's group (``n`` units): (n, everything else)."""
    t = t.movedim(m.axis, 0)
    if m.segment or t.shape[0] != n * m.inner:
        t = t[m.start : m.start + n * m.inner]
    if m.inner > 1:
        t = t.reshape(n, m.inner, *t.shape[1:])
    return t.reshape(n, -1)
