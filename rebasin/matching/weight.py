"""Weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023, Algorithm 1).

Maximize ``sum_params <A, pi(B)>`` by coordinate descent: for one group, with every other group
held fixed, the objective is linear in that group's permutation, so one exact linear assignment
solves it. Groups are visited in a seeded random order; a sweep that improves nothing ends the
run. A group is skipped when none of its neighbours changed since it was last solved.

Where the products are what costs (a sweep of at least :data:`REACH_FIRST_WORK` multiply-adds),
the first sweep visits units by their reach first (ties in the seeded random order): the
multiply-adds of the neighbours' costs that a move of the unit makes stale
(:meth:`CostModel.reach`). Units that reach far (a transformer's residual stream) neighbour
nearly everything: solved first, the others are solved against their answer instead of being
solved again in the next sweep. On a planted TinyLlama-shape pair this makes two sweeps of three
and 1.3 sweeps of products instead of 1.85. (Ordering by a unit's own work instead loses planted
recovery on a small GPT-2, whose head groups are wide but reach little.) Below that size the
products are cheap, the assignments are the time, and the order only changes which local optimum
the descent reaches: on small trained MLP pairs reach-first reached lower objectives than the
paper's random order (``docs/results.md``), so small models keep the random order throughout.

Consecutive groups that share no tensor are independent (the objective splits between them):
solving them one after another or all from the same state is the same step. So the products of
the next one run (in a thread) while the current assignment is solved.

Memory is bounded: tensors are read from the mappings (lazy checkpoints read them from disk) one
member at a time in their stored dtype, and upcast a block of columns at a time for the products
(:mod:`rebasin.matching.costs`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from rebasin._memory import now_and_then_trim, reusing_freed_memory
from rebasin.core.errors import MatchError
from rebasin.core.types import Permutation, Progress
from rebasin.matching.assignment import PROCESSES, plan_concurrency, resolve_backend, solve_unit
from rebasin.matching.costs import CostModel, GroupProducts
from rebasin.matching.lapjv_workers import LapjvWorkers
from rebasin.matching.result import GroupStats, MatchResult, RestartTrace, capped
from rebasin.permutation import random_permutation
from rebasin.spec.core import PermutationSpec

OBJECTIVE = "<A, pi(B)>"
Unit = tuple[str, ...]


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
    time_budget: float | None = None,
    sketch: int = 1,
    known: Mapping[str, float] | None = None,
    settle_later: bool = False,
    first: GroupProducts | None = None,
    workers: int = 0,
) -> MatchResult:
    """Find the permutation of ``b`` that aligns it with ``a`` (the options are those of
    :class:`rebasin.matching.methods.WeightMatching`; ``init`` starts run 0 there).

    Run 0 starts at the identity (or ``init``), later runs at a random permutation; the run with
    the highest objective wins. Runs are reproducible from ``seed``. The objective sums over the
    spec's parameters only: running statistics and ``buffers`` are permuted with their groups but
    carry no weight (:meth:`PermutationSpec.cost_params`). With ``time_budget`` (seconds), the
    search stops at the end of the last sweep completed within it and says so (``stopped``).
    With ``sketch`` > 1, each run first descends on costs from one in ``sketch`` contracted
    columns (a fixed random subset), then goes on with exact costs from where that phase ended:
    the result is a fixed point of the exact method, like a run without it.

    Two exact float64 objectives bracket a run, each a pass over both models; callers that pass
    over them anyway can take them along. ``known`` (:class:`CostModel`) gives the start's from
    the input scan, and ``first`` (:func:`first_products`) the first unit's products.
    ``settle_later``, with one run, leaves the end's to the caller's pass over pi(B)
    (:attr:`MatchResult.unsettled`, :meth:`MatchResult.settle`). ``workers``: assignments
    solved at once (:func:`plan_concurrency`; 0: as the machine allows)."""
    if max_iter < 1 or restarts < 1:
        raise MatchError("max_iter and restarts must be at least 1")
    largest = max(spec.sizes.values(), default=0)
    workers, at_once = plan_concurrency(workers, backend, largest, torch.device(device).type == "cpu")
    backend = resolve_backend(backend)
    t0 = time.perf_counter()
    with (
        reusing_freed_memory(),  # tensor after tensor: the same pages, not fresh ones
        contextlib.closing(
            CostModel(a, b, spec, torch.device(device), buffers, known=known, first=first)
        ) as model,
        contextlib.closing(LapjvWorkers(workers if at_once == PROCESSES else 0)) as processes,
    ):
        deadline = t0 + time_budget if time_budget is not None else None
        search = _Search(model, backend, tol, progress, deadline, workers, at_once, processes)
        best: _Run | None = None
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
            run = _phased(search, start, rng, max_iter, label, sketch, settle_later and restarts == 1)
            traces.append(
                RestartTrace(
                    run_seed, how, run.history[-1], run.sweeps, run.converged, run.history, run.seconds
                )
            )
            if best is None or run.history[-1] > best.history[-1]:
                best, best_k = run, k
            if search.stopped:
                break
        assert best is not None
        perm = best.perm
        if traces[0].init == "identity":
            at_identity = traces[0].objective_per_sweep[0]
        else:
            at_identity = model.objective({g: torch.arange(n) for g, n in spec.sizes.items()})
        return MatchResult(
            perm=perm,
            objective_identity=at_identity,
            objective=best.history[-1],
            groups={g: best.group_stats(g, model) for g in spec.sizes},
            objective_name=OBJECTIVE,
            maximize=True,
            history=best.history,
            converged=best.converged,
            restarts=traces,
            best_restart=best_k,
            options={
                "max_iter": max_iter,
                "restarts": restarts,
                "seed": seed,
                "device": device,
                "backend": backend,
                "workers": workers,
                "backend_at_once": at_once,
                "time_budget": time_budget,
                "sketch": sketch,
            },
            seconds=time.perf_counter() - t0,
            stopped=search.stopped,
            profile={**model.profile(), "assign_s": round(search.assign_s, 4)},
            unsettled=tuple(model.params) if not best.exact else (),
        )


def first_products(
    a: Mapping[str, torch.Tensor], spec: PermutationSpec, buffers: Collection[str] = ()
) -> GroupProducts | None:
    """What a pass over both models may take for weight matching's first unit: that unit's
    products at the identity, when the first sweep goes by reach and the unit that reaches
    farthest, alone, is the group the later sweeps gather (:attr:`CostModel.gather`: a
    transformer's residual stream). None otherwise. From shapes alone."""
    model = CostModel(a, a, spec, torch.device("cpu"), buffers, scratch=False)
    try:
        g = model.gather
        if g is None or (g,) not in spec.units:
            return None
        reach = _first_reach(model)
        if not any(reach) or reach.count(max(reach)) > 1 or model.reach((g,)) != max(reach):
            return None
        members = model.members[g]
        return GroupProducts(g, spec.sizes[g], members, model.moving_members(g))
    finally:
        model.close()


def _first_reach(model: CostModel) -> list[float]:
    """Each unit's reach, by which the first sweep orders them (most first), where a full sweep's
    products come to :data:`REACH_FIRST_WORK`; all 0 (the seeded random order) below it."""
    units = model.spec.units
    full = sum(model.work(u) for u in units) * model.sketch
    return [model.reach(u) if full >= REACH_FIRST_WORK else 0.0 for u in units]


def batches(spec: PermutationSpec, order: Sequence[int]) -> list[list[Unit]]:
    """The units in ``order``, cut into runs of consecutive units that share no tensor: solving a
    run's units one after another or all from the same state is the same step."""
    units = spec.units
    out: list[list[Unit]] = []
    touched: set[str] = set()
    for i in order:
        u = units[int(i)]
        reach = set().union(*(spec.neighbours[g] | {g} for g in u))
        if not out or touched & set(u):  # u shares a tensor with the run so far
            out.append([])
            touched = set()
        out[-1].append(u)
        touched |= reach
    return out


def _phased(
    search: _Search,
    start: Permutation,
    rng: np.random.Generator,
    max_iter: int,
    label: str,
    sketch: int,
    settle_later: bool = False,
) -> _Run:
    """One run: with ``sketch`` > 1, a descent on sketched costs, then the exact one from there
    (``settle_later``: the exact objective at its end is left to the caller)."""
    if sketch <= 1:
        return search.descend(start, rng, max_iter, label, settle_later=settle_later)
    search.model.sketch = sketch
    try:
        first = search.descend(start, rng, max_iter, f"{label}, sketch 1/{sketch}")
    finally:
        search.model.sketch = 1
    if search.stopped or first.sweeps >= max_iter:
        first.converged = False
        first.stats = {}  # they came from sketched costs: the report's group figures are exact
        return first
    run = search.descend(first.perm, rng, max_iter - first.sweeps, label, first.history[-1], settle_later)
    run.history = first.history + run.history[1:]
    run.seconds = first.seconds + run.seconds
    run.sweeps += first.sweeps
    return run


class _Run:
    """One run's state: its permutation, objective per sweep, and the latest statistics of every
    group with the permutations they were computed under."""

    def __init__(self, perm: Permutation, first: float):
        self.perm = perm
        self.history = [first]
        self.seconds: list[float] = []
        self.sweeps = 0
        self.converged = False
        self.moved: dict[str, int] = {}
        """Units each group's last solve moved (a solve that moved few starts from its answer)."""
        self.exact = True
        """Whether ``history[-1]`` is the exact objective of ``perm`` (else it is left to settle)."""
        self.stats: dict[str, tuple[float, float, dict[str, torch.Tensor]]] = {}

    def group_stats(self, g: str, model: CostModel) -> GroupStats:
        """:class:`GroupStats` at the final permutation: from the last cost of ``g`` when nothing
        it depends on has moved since, else from a fresh one."""
        n = model.spec.sizes[g]
        kept = self.stats.get(g)
        if kept is not None and all(torch.equal(self.perm[h], p) for h, p in kept[2].items()):
            before, after = kept[0], kept[1]
        else:
            c = model.cost(g, self.perm)
            before = float(np.trace(c, dtype=np.float64))
            after = float(c[np.arange(n), self.perm[g].numpy()].sum(dtype=np.float64))
        moved = float((self.perm[g] != torch.arange(n)).float().mean())
        return GroupStats(size=n, objective_before=before, objective_after=after, moved_fraction=moved)


class _Search:
    """Coordinate descent over batches of independent units, with progress, an ETA and an
    optional deadline."""

    def __init__(
        self,
        model: CostModel,
        backend: str,
        tol: float,
        progress: Progress | None,
        deadline: float | None,
        workers: int,
        at_once: str,
        processes: LapjvWorkers,
    ):
        self.model = model
        self.backend = backend
        self.workers = workers
        """Assignments solved at once (threads, each waiting on a worker process or on scipy)."""
        self.at_once = at_once
        """The back-end of a group's first solve in a run, beside others' (:meth:`_solutions`):
        LAPJV in worker processes (:data:`PROCESSES`) or scipy. The others take :attr:`backend`
        here (re-solves near the optimum, whose costs only the neighbours' moves changed, are
        cheap from the rows' best columns, cheaper than sending the cost to a process; the
        heads' small blocks too)."""
        self.processes = processes
        """Worker processes for :data:`PROCESSES` solves."""
        self._lock = threading.Lock()
        self.tol = tol
        self.progress = progress
        self.deadline = deadline
        self.stopped: str | None = None
        self.assign_s = 0.0

    def descend(
        self,
        perm: Permutation,
        rng: np.random.Generator,
        max_iter: int,
        label: str,
        first: float | None = None,
        settle_later: bool = False,
    ) -> _Run:
        """One descent from ``perm`` (whose exact objective is ``first``, when known). A sweep's
        objective is the last one plus the gains of its moves, read off the cost matrices the
        sweep computed; a sweep whose gain is within the float32 products' rounding
        (:data:`NOISE`), every sketched sweep and the run's end take the exact (float64) objective,
        and a sweep that does not raise it is undone and ends the run (with ``settle_later``, the
        end's exact objective is left to the caller)."""
        spec = self.model.spec
        run = _Run(perm, self.model.objective(perm) if first is None else first)
        dirty = set(spec.sizes)  # groups whose cost may have changed since last solved
        reach = _first_reach(self.model)
        for sweep in range(1, max_iter + 1):
            start = {g: v.clone() for g, v in run.perm.items()}
            t_sweep = time.perf_counter()
            order = [int(i) for i in rng.permutation(len(spec.units))]
            if sweep == 1:  # most-reaching units first (a stable sort: ties keep the seeded order)
                order.sort(key=lambda i: -reach[i])
            todo = batches(spec, order)
            total_work = sum(self.model.work(u) for b in todo for u in b if not dirty.isdisjoint(u))
            done_work = gain = 0.0
            for batch in todo:
                if self.deadline is not None and time.perf_counter() > self.deadline:
                    run.perm = start
                    self.stopped = (
                        f"time budget reached during sweep {sweep}: the result is that of sweep {sweep - 1}"
                    )
                    return self._finish(run, settle_later)
                stage = [u for u in batch if not dirty.isdisjoint(u)]  # batch-mates never dirty each other
                for u in stage:
                    dirty.difference_update(u)
                for unit, costs, new in self._solutions(stage, run):
                    gain += self._apply(run, unit, costs, new, dirty)
                    now_and_then_trim()
                    done_work += self.model.work(unit)
                    self._report(label, sweep, unit, done_work / max(total_work, 1.0), t_sweep)
            run.sweeps = sweep
            run.seconds.append(round(time.perf_counter() - t_sweep, 4))
            last = run.history[-1]
            if gain > 0 and self.model.sketch == 1 and gain > NOISE * max(1.0, abs(last)):
                run.history.append(last + gain)
                run.exact = False
            else:
                if gain == 0:
                    before = value = last
                elif run.exact:
                    before, value = last, self.model.objective(run.perm)
                else:  # both exact values in one read
                    before, value = self.model.objectives([start, run.perm])
                if value <= before:
                    # nothing moved, or gains below the products' rounding: the exact objective
                    # did not rise, so the sweep's moves are undone and the run has converged
                    run.perm = start
                    run.history[-1] = before
                    run.history.append(before)
                    run.converged = True
                    run.exact = run.exact or gain > 0
                    return self._finish(run, settle_later)
                run.history.append(value)
                run.exact = True
            if self.deadline is not None and time.perf_counter() > self.deadline and sweep < max_iter:
                self.stopped = f"time budget reached after sweep {sweep}"
                return self._finish(run, settle_later)
        return self._finish(run, settle_later)

    def _finish(self, run: _Run, settle_later: bool = False) -> _Run:
        """End a run with the exact objective of its permutation (:func:`capped`), or, with
        ``settle_later``, with its estimate, to be settled by the caller."""
        if not run.exact and not settle_later:
            run.history = capped(run.history, self.model.objective(run.perm))
            run.exact = True
        return run

    def _solutions(
        self, stage: Sequence[Unit], run: _Run
    ) -> Iterator[tuple[Unit, dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """Each unit of a stage, in order, with its cost matrices and their assignments' answer.
        The units are independent, so their costs and answers are the same whether taken before
        or after the others are solved: a thread computes the products of the units ahead
        (releasing the interpreter lock) while up to :attr:`workers` assignments are solved."""
        spec = self.model.spec
        near = {  # a unit's solve alone changes its groups' moves and permutations
            g: run.perm[g].numpy()
            for u in stage
            for g in u
            if run.moved.get(g, spec.sizes[g]) <= spec.sizes[g] * NEAR
        }
        if len(stage) == 1:
            costs = self.model.unit_costs(stage[0], run.perm)
            yield stage[0], costs, self._assign(costs, near, self.backend)
            return
        # a group's first solve in this run, beside others (not of head-structured units)
        backends = {
            u: self.backend if any(g in run.moved or g in spec.heads for g in u) else self.at_once
            for u in stage
        }
        fixed = dict(run.perm)  # the other stages' groups do not move during this stage
        products = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rebasin-costs")
        solver = (  # one at a time: solved here, while the next costs are computed
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="rebasin-assign")
            if self.workers > 1
            else None
        )

        def job(unit: Unit) -> tuple[dict[str, np.ndarray], Future[dict[str, np.ndarray]] | None]:
            costs = self.model.unit_costs(unit, fixed)
            return costs, solver.submit(self._assign, costs, near, backends[unit]) if solver else None

        todo = list(stage)
        pending: deque[
            tuple[Unit, Future[tuple[dict[str, np.ndarray], Future[dict[str, np.ndarray]] | None]]]
        ]
        pending = deque()
        try:
            while todo or pending:
                while todo and len(pending) < self.workers + AHEAD:
                    unit = todo.pop(0)
                    pending.append((unit, products.submit(job, unit)))
                unit, job_done = pending.popleft()
                costs, answer = job_done.result()
                yield unit, costs, answer.result() if answer else self._assign(costs, near, backends[unit])
        except BaseException:  # an error or an interrupt: solves in worker processes end now
            self.processes.close()
            raise
        finally:  # and what has not started is dropped
            products.shutdown(cancel_futures=True)
            if solver is not None:
                solver.shutdown(cancel_futures=True)

    def _assign(
        self, costs: dict[str, np.ndarray], near: Mapping[str, np.ndarray], backend: str
    ) -> dict[str, np.ndarray]:
        """The unit's assignments by ``backend`` (timed into :attr:`assign_s`)."""
        t0 = time.perf_counter()
        hints = {g: near[g] for g in costs if g in near}
        if backend == PROCESSES:  # plain groups (heads stay here)
            new = {g: self.processes.solve(c, hints.get(g)) for g, c in costs.items()}
        else:
            new = solve_unit(costs, self.model.spec.heads, backend, hints, str(self.model.device))
        with self._lock:
            self.assign_s += time.perf_counter() - t0
        return new

    def _apply(
        self, run: _Run, unit: Unit, costs: dict[str, np.ndarray], new: dict[str, np.ndarray], dirty: set[str]
    ) -> float:
        """Keep a unit's answer when it raises the objective, and return the gain (0 when kept
        as it was)."""
        spec = self.model.spec
        old_val = new_val = 0.0
        for g, c in costs.items():
            rows = np.arange(spec.sizes[g])
            old_val += float(c[rows, run.perm[g].numpy()].sum(dtype=np.float64))
            new_val += float(c[rows, new[g]].sum(dtype=np.float64))
        better = new_val > old_val + self.tol * max(1.0, abs(old_val))
        for g in unit:
            run.moved[g] = int((new[g] != run.perm[g].numpy()).sum()) if better else 0
        if better:
            for g in unit:
                run.perm[g] = torch.from_numpy(new[g])
                dirty |= spec.neighbours[g]
        self.model.solved(unit, run.perm, better)
        for g, c in costs.items():
            rows = np.arange(spec.sizes[g])
            kept = float(c[rows, run.perm[g].numpy()].sum(dtype=np.float64))
            snapshot = {h: run.perm[h] for h in spec.neighbours[g] | {g}}
            run.stats[g] = (float(np.trace(c, dtype=np.float64)), kept, snapshot)
        return new_val - old_val if better else 0.0

    def _report(self, label: str, sweep: int, unit: Unit, frac: float, t_sweep: float) -> None:
        if not self.progress:
            return
        spent = time.perf_counter() - t_sweep
        eta = spent / frac - spent if frac > 0 else 0.0
        name = unit[0] if len(unit) == 1 else f"{unit[0]} +{len(unit) - 1}"
        self.progress(f"{label}, sweep {sweep}) group '{name}', {_clock(eta)} left in sweep", frac, 1.0)


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


REACH_SWEEPS = 1.5
"""Sweeps of products of a run whose first sweep goes by reach, for ``--dry-run``
(:meth:`rebasin.matching.methods.WeightMatching.planned_sweeps`; later sweeps pay only for what
moved): measured 0.96-1.07 inside matching, plus the residual stream's first products taken by
the scan (about a third of a sweep), on planted and independent TinyLlama-shape pairs and a
planted 7B-shape pair; 1.3 on the planted small shape."""

REACH_FIRST_WORK = 1e10
"""Multiply-adds of a full sweep's products from which the first sweep goes by reach (about a
second of products on a CPU core; a 0.16B-parameter LLaMA shape does 3.5e11, a 3 x 512 MLP 5.5e8)."""

NOISE = 1e-6
"""Gain of a sweep, relative to the objective, below which the float32 products cannot be
trusted to tell an improvement: such a sweep is checked on the exact objective."""

NEAR = 0.25
"""Share of a group's units its last solve may have moved for the next solve to start from the
group's permutation (:func:`solve_assignment`'s ``near``: 1.5-2x faster near the optimum, much
slower far from it; measured on trained 3 x 512 MLP costs)."""

AHEAD = 1
"""Units whose costs are computed ahead, in a worker thread, beyond those being solved."""
