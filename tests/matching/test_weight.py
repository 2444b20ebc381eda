"""Weight matching: monotone objective, determinism, restarts, back-ends, diagnostics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from cases import CASES
from helpers import tiny

from rebasin.matching import match
from rebasin.matching.assignment import PROCESSES, solve_assignment
from rebasin.models import build_model
from rebasin.permutation import permute, random_permutation
from rebasin.spec import infer_spec


def pair(name: str = "mlp", **kw: object) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    a = build_model(name, **kw).state_dict()
    torch.manual_seed(1)
    b = build_model(name, **kw).state_dict()
    return a, b


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_objective_never_decreases(name: str) -> None:
    a, b = pair(name) if name == "resnet20" else pair(name, in_features=16, hidden=64)
    spec = infer_spec(a)
    result = match(a, b, spec, restarts=3, seed=5)
    for trace in result.restarts:
        h = trace.objective_per_sweep
        assert all(y >= x - 1e-6 * abs(x) for x, y in itertools.pairwise(h)), h
        assert trace.sweeps == len(h) - 1
    assert result.objective == max(t.objective for t in result.restarts)
    assert result.objective == result.restarts[result.best_restart].objective
    assert result.objective >= result.objective_identity


def test_objective_matches_direct_inner_product() -> None:
    a, b = pair("mlp", in_features=16, hidden=32)
    spec = infer_spec(a)
    r = match(a, b, spec)
    pb = permute(b, spec, r.perm)
    direct = sum(float((a[k].double() * pb[k].double()).sum()) for k in spec.params)
    assert r.objective == pytest.approx(direct, rel=1e-9)
    ident = sum(float((a[k].double() * b[k].double()).sum()) for k in spec.params)
    assert r.objective_identity == pytest.approx(ident, rel=1e-9)


def test_same_seed_same_result_and_seeds_matter() -> None:
    a, b = pair("mlp", in_features=16, hidden=64)
    spec = infer_spec(a)
    r1 = match(a, b, spec, seed=3, restarts=2)
    r2 = match(a, b, spec, seed=3, restarts=2)
    assert all(torch.equal(r1.perm[g], r2.perm[g]) for g in spec.sizes)
    assert r1.restarts[0].objective_per_sweep == r2.restarts[0].objective_per_sweep
    assert r1.restarts[1].init == "random"


def test_group_stats() -> None:
    a, b = pair("mlp", in_features=16, hidden=32)
    spec = infer_spec(a)
    r = match(a, b, spec)
    for g, s in r.groups.items():
        assert s.size == spec.sizes[g]
        assert s.objective_after >= s.objective_before - 1e-9
        assert 0.0 <= s.moved_fraction <= 1.0
    assert r.converged


def test_max_iter_caps_sweeps() -> None:
    a, b = pair("mlp", in_features=16, hidden=64)
    spec = infer_spec(a)
    r = match(a, b, spec, max_iter=1)
    assert r.restarts[0].sweeps == 1


@pytest.mark.parametrize("n", [1, 5, 64])
def test_assignment_backends_agree(n: int) -> None:
    rng = np.random.default_rng(n)
    c = rng.standard_normal((n, n))
    p1, p2 = solve_assignment(c, "scipy"), solve_assignment(c, "lap")
    assert sorted(p1.tolist()) == list(range(n))
    assert c[np.arange(n), p1].sum() == pytest.approx(c[np.arange(n), p2].sum())
    # maximization: better than any random permutation
    for _ in range(5):
        q = rng.permutation(n)
        assert c[np.arange(n), p1].sum() >= c[np.arange(n), q].sum() - 1e-12


@pytest.mark.parametrize("backend", ["scipy", "lap", "auction"])
@pytest.mark.parametrize("scale", [1e-200, 1e-6, 1e7, 1e30, 1e200])
def test_the_optimum_at_any_scale_of_costs(backend: str, scale: float) -> None:
    """LAPJV starts its searches at a fixed large value: unscaled, past a span of about 1e7 its
    answer was wrong. Every back-end finds scipy's optimum at any scale."""
    from scipy.optimize import linear_sum_assignment

    c = np.random.default_rng(0).standard_normal((300, 300)) * scale
    want = linear_sum_assignment(c, maximize=True)[1]
    assert np.array_equal(solve_assignment(c, backend), want)


@pytest.mark.parametrize("backend", ["scipy", "lap"])
def test_a_hint_near_the_optimum_changes_nothing_but_the_speed(backend: str) -> None:
    """Rows reduced at a hint (the optimum itself, a few swaps from it, or a random
    permutation) give the optimum found without it."""
    rng = np.random.default_rng(0)
    n = 96
    c = rng.standard_normal((n, n)).astype(np.float32)
    best = solve_assignment(c, backend)
    near = best.copy()
    near[[0, 1, 2, 3]] = near[[3, 2, 1, 0]]
    for hint in (best, near, rng.permutation(n)):
        assert np.array_equal(solve_assignment(c, backend, hint), best)


@pytest.mark.parametrize("backend", ["scipy", "lap"])
def test_rows_whose_best_columns_all_differ_are_solved_by_them(backend: str) -> None:
    """Where every row's best column is a different one (aligned or planted pairs), that is the
    optimum a full solve finds; where two rows share one, the full solve runs; an empty cost
    has the empty permutation."""
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(1)
    n = 200
    planted = rng.permutation(n)
    c = rng.standard_normal((n, n)).astype(np.float32)
    c[np.arange(n), planted] += 10.0
    assert np.array_equal(c.argmax(axis=1), planted)
    assert np.array_equal(solve_assignment(c, backend), planted)
    assert np.array_equal(linear_sum_assignment(c, maximize=True)[1], planted)
    c[1, planted[0]] = c[1].max() + 1.0  # rows 0 and 1 now share their best column
    p = solve_assignment(c, backend)
    assert sorted(p.tolist()) == list(range(n))
    full = c[np.arange(n), linear_sum_assignment(c, maximize=True)[1]].sum(dtype=np.float64)
    assert c[np.arange(n), p].sum(dtype=np.float64) == pytest.approx(full, rel=1e-12)
    assert solve_assignment(np.zeros((0, 0)), backend).shape == (0,)


def test_progress_callback_is_called() -> None:
    a, b = pair("mlp", in_features=16, hidden=32)
    calls: list[tuple[str, float, float]] = []
    match(a, b, infer_spec(a), progress=lambda d, c, t: calls.append((d, c, t)))
    assert calls and calls[0][0].startswith("weight matching")


def test_two_level_assignment_is_exact_over_head_structured_permutations() -> None:
    import itertools

    import numpy as np

    from rebasin.matching.assignment import solve_unit
    from rebasin.spec.core import Heads

    rng = np.random.default_rng(0)
    k, d = 3, 2
    costs = {"qk": rng.standard_normal((k * d, k * d)), "vo": rng.standard_normal((k * d, k * d))}
    heads = {"qk": Heads(k, "t"), "vo": Heads(k, "t")}
    got = solve_unit(costs, heads, "scipy")

    def value(p: dict[str, np.ndarray]) -> float:
        return sum(float(c[np.arange(k * d), p[g]].sum()) for g, c in costs.items())

    best = -np.inf
    inner = list(itertools.permutations(range(d)))
    for sigma in itertools.permutations(range(k)):
        for taus in itertools.product(inner, repeat=2 * k):  # a within-head order per head and group
            p = {
                g: np.concatenate([sigma[i] * d + np.array(taus[j * k + i]) for i in range(k)])
                for j, g in enumerate(costs)
            }
            best = max(best, value(p))
    assert value(got) == pytest.approx(best)
    # heads stay whole and move together
    for g in costs:
        assert (got[g].reshape(k, d) // d == (got["qk"].reshape(k, d) // d)[:, :1]).all()


def test_running_statistics_carry_no_weight() -> None:
    """B is a permuted copy of A whose BatchNorm running statistics are replaced by large random
    values: they are permuted with their groups but weigh nothing, so the planted permutation comes
    back exactly and the objective is the weights' alone."""
    from rebasin.permutation import random_permutation

    a, _ = pair("resnet20")
    spec = infer_spec(a)
    planted = random_permutation(spec, 3)
    b = dict(permute(a, spec, planted))
    gen = torch.Generator().manual_seed(0)
    for k in b:
        if k.endswith(("running_mean", "running_var")):
            b[k] = 100 * torch.rand(b[k].shape, generator=gen)
    r = match(a, b, spec)
    back = permute(b, spec, r.perm)
    weights = [k for k in spec.params if not k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(back[k], a[k]) for k in weights)
    direct = sum(float((a[k].double() * back[k].double()).sum()) for k in weights)
    assert r.objective == pytest.approx(direct, rel=1e-9)
    assert spec.cost_params() == weights


def test_time_budget_stops_at_the_last_complete_sweep_and_says_so() -> None:
    a, b = pair("mlp", in_features=16, hidden=64)
    spec = infer_spec(a)
    r = match(a, b, spec, time_budget=1e-9)
    assert r.stopped == "time budget reached during sweep 1: the result is that of sweep 0"
    assert r.converged is False
    assert all(torch.equal(p, torch.arange(len(p))) for p in r.perm.values())
    assert r.history == [r.objective_identity]
    full = match(a, b, spec)
    assert full.stopped is None and full.converged


@pytest.mark.parametrize("planted", [True, False])
def test_sketched_first_phase_ends_at_a_fixed_point_of_the_exact_method(planted: bool) -> None:
    a, b = pair("mlp", in_features=16, hidden=64)
    spec = infer_spec(a)
    if planted:
        torch.manual_seed(3)
        b = dict(permute(a, spec, {g: torch.randperm(n) for g, n in spec.sizes.items()}))
    r = match(a, b, spec, sketch=4)
    assert r.converged
    assert all(y >= x for x, y in itertools.pairwise(r.history))
    # exact weight matching from its answer moves nothing
    exact = match(a, permute(b, spec, r.perm), spec)
    assert all(torch.equal(p, torch.arange(len(p))) for p in exact.perm.values())


@pytest.mark.parametrize("family", ["cases", "gpt2", "llama"])
def test_reach_first_sweep_recovers_planted_permutations(monkeypatch, family: str) -> None:
    """The first sweep by reach (large models) recovers planted permutations exactly, on tiny
    models of every family with the size threshold lowered to zero."""
    monkeypatch.setattr("rebasin.matching.weight.REACH_FIRST_WORK", 0.0)
    if family == "cases":
        states = [(c.make(0).state_dict(), None) for c in CASES]
    else:
        model = tiny(family, 0)
        states = [(dict(model.state_dict()), model.config.to_dict())]
    for state, config in states:
        spec = infer_spec(state, config=config)
        b = dict(permute(state, spec, random_permutation(spec, 7)))
        result = match(state, b, spec, seed=1)
        back = permute(b, spec, result.perm)
        assert all(torch.equal(back[k], state[k]) for k in spec.params)


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_objectives_taken_by_other_passes_give_the_same_bits(name: str) -> None:
    """The start's objective from the scan's dots and the end's settled from the write pass's
    equal the ones weight matching takes itself, bit for bit, and the run reads neither."""
    from rebasin.matching.costs import param_dot
    from rebasin.matching.weight import weight_matching

    a, b = pair(name) if name == "resnet20" else pair(name, in_features=16, hidden=64)
    spec = infer_spec(a)
    ref = weight_matching(a, b, spec, seed=2)
    weighed = spec.cost_params()
    known = {p: param_dot(a[p], b[p]) for p in weighed}
    r = weight_matching(a, b, spec, seed=2, known=known, settle_later=True)
    assert r.objective_identity == ref.objective_identity
    assert all(torch.equal(r.perm[g], ref.perm[g]) for g in spec.sizes)
    if ref.history[-1] != ref.history[-2]:  # the last sweep's estimate was left to settle
        assert r.unsettled == tuple(weighed)
    pb = permute(b, spec, r.perm)
    settled = r.settle({p: param_dot(a[p], pb[p]) for p in r.unsettled})
    assert settled.objective == ref.objective and settled.history == ref.history
    assert settled.restarts[0].objective_per_sweep == ref.restarts[0].objective_per_sweep
    assert not settled.unsettled and settled.settle({}) is settled
    assert r.profile["objective_read_bytes"] < ref.profile["objective_read_bytes"] or (
        ref.profile["objective_read_bytes"] == 0
    )


def test_results_compared_between_runs_are_never_left_to_settle() -> None:
    from rebasin.matching.weight import weight_matching

    a, b = pair("mlp", in_features=16, hidden=64)
    spec = infer_spec(a)
    r = weight_matching(a, b, spec, restarts=2, settle_later=True)
    assert not r.unsettled
    assert r.objective == weight_matching(a, b, spec, restarts=2).objective


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_assignments_solved_at_once_give_the_answer_of_one_at_a_time(family: str) -> None:
    """Independent units' assignments solved in threads give the permutations, objectives and
    group figures of solving them one after another (the same back-end), on trained-like
    (independent) and planted pairs."""
    from rebasin.matching.weight import weight_matching

    a = dict(tiny(family, 0).state_dict())
    config = tiny(family, 0).config.to_dict()
    spec = infer_spec(a, config=config)
    independent = dict(tiny(family, 1).state_dict())
    planted = dict(permute(a, spec, random_permutation(spec, 7)))
    for b, backend in itertools.product((independent, planted), ("scipy", "auto")):
        # auto: LAPJV, one at a time here and in worker processes at once
        one = weight_matching(a, b, spec, seed=4, backend=backend, workers=1)
        many = weight_matching(a, b, spec, seed=4, backend=backend, workers=3)
        assert many.options["workers"] == 3 and one.options["workers"] == 1
        assert many.options["backend_at_once"] == ("scipy" if backend == "scipy" else PROCESSES)
        assert all(torch.equal(one.perm[g], many.perm[g]) for g in spec.sizes)
        assert one.history == many.history and one.objective == many.objective
        assert one.groups == many.groups
    back = permute(planted, spec, many.perm)
    assert all(torch.equal(back[k], a[k]) for k in spec.params)


def test_how_many_assignments_at_once(monkeypatch) -> None:
    from rebasin.core.errors import ConfigError
    from rebasin.matching import assignment
    from rebasin.matching.assignment import plan_concurrency
    from rebasin.matching.methods import WeightMatching

    monkeypatch.setattr(assignment, "usable_cores", lambda: 16)
    monkeypatch.setattr(assignment, "_available_bytes", lambda: 64 << 30)
    lap = assignment.resolve_backend("auto")
    assert plan_concurrency(0, "auto", 512, True) == (1, lap)  # small groups: one at a time
    assert plan_concurrency(0, "auto", 5632, True) == (8, PROCESSES)  # half the cores
    assert plan_concurrency(0, "auto", 5632, False) == (15, PROCESSES)  # products on a GPU
    assert plan_concurrency(0, "auto", 11008, False) == (8, PROCESSES)  # 16 GiB of assignments
    assert plan_concurrency(0, "lap", 5632, False) == (15, PROCESSES)
    assert plan_concurrency(0, "scipy", 5632, False) == (15, "scipy")  # threads
    assert plan_concurrency(2, "auto", 512, True) == (2, PROCESSES)  # asked for
    assert plan_concurrency(1, "scipy", 5632, False) == (1, "scipy")
    monkeypatch.setattr(assignment, "usable_cores", lambda: 4)
    assert plan_concurrency(0, "auto", 5632, True) == (1, lap)
    monkeypatch.setattr(assignment, "_available_bytes", lambda: 4 << 30)
    assert plan_concurrency(8, "scipy", 11008, False) == (1, "scipy")  # a quarter of 4 GiB
    monkeypatch.setattr(assignment.sys, "frozen", True, raising=False)  # a frozen application
    assert plan_concurrency(2, "auto", 512, True) == (2, "scipy")  # threads, no processes
    with pytest.raises(ConfigError, match=r"--assign-workers must be 0 .* or more, got -1"):
        plan_concurrency(-1, "auto", 512, True)
    with pytest.raises(ConfigError, match="--assign-workers must be at least 0, got -2"):
        WeightMatching(assign_workers=-2)


def test_worker_processes_give_lapjv_s_answers() -> None:
    """LAPJV in worker processes answers as in this process: any size, with a near hint, from
    threads at once, and a cost that is not finite raises the same error (the worker goes on)."""
    import contextlib
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from rebasin.matching.lapjv_workers import LapjvWorkers

    rng = np.random.default_rng(0)
    with contextlib.closing(LapjvWorkers(2)) as workers:
        for n in (0, 1, 7, 300):
            c = rng.standard_normal((n, n)).astype(np.float32)
            want = solve_assignment(c, "lap")
            assert np.array_equal(workers.solve(c), want)
            assert np.array_equal(workers.solve(c, want), solve_assignment(c, "lap", want))
        costs = [rng.standard_normal((200, 200)).astype(np.float32) for _ in range(6)]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(workers.solve, costs))
        assert all(np.array_equal(g, solve_assignment(c, "lap")) for g, c in zip(got, costs, strict=True))
        with pytest.raises(ValueError, match="cost matrix holds NaN or Inf"):
            workers.solve(np.full((3, 3), np.nan, dtype=np.float32))
        assert np.array_equal(workers.solve(costs[0]), got[0])
        procs = list(workers._all)
        assert 1 <= len(procs) <= 2
    assert all(p.poll() is not None for p in procs)  # closed: none left
    code = "import sys, rebasin.matching.lapjv_workers; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # a worker imports no torch


def test_a_worker_process_that_ends_stops_the_run_with_one_clear_error(monkeypatch) -> None:
    """A worker process that ends mid-run (killed, out of memory) stops the run with a
    MatchError naming it; no thread or process is left."""
    import subprocess
    import sys
    import threading

    from rebasin.core.errors import MatchError
    from rebasin.matching import lapjv_workers
    from rebasin.matching.weight import weight_matching

    started: list[subprocess.Popen[bytes]] = []

    def dying() -> subprocess.Popen[bytes]:
        pipe = subprocess.PIPE
        started.append(subprocess.Popen([sys.executable, "-c", "pass"], stdin=pipe, stdout=pipe))
        return started[-1]

    monkeypatch.setattr(lapjv_workers, "_start", dying)
    model = tiny("llama", 0)
    a = dict(model.state_dict())
    spec = infer_spec(a, config=model.config.to_dict())
    b = dict(tiny("llama", 1).state_dict())
    with pytest.raises(MatchError, match="an assignment worker process ended unexpectedly"):
        weight_matching(a, b, spec, workers=2)
    assert started and all(p.poll() is not None for p in started)
    alive = [t.name for t in threading.enumerate() if t.name.startswith(("rebasin-assign", "rebasin-costs"))]
    assert alive == []


def test_a_failed_assignment_stops_its_stage_and_leaves_no_thread(monkeypatch) -> None:
    import threading

    from rebasin.matching import weight

    model = tiny("llama", 0)
    a = dict(model.state_dict())
    spec = infer_spec(a, config=model.config.to_dict())
    b = dict(tiny("llama", 1).state_dict())
    calls = []
    solve = weight.solve_unit

    def failing(*args, **kw):  # fails in the solvers' threads (stages of several units)
        calls.append(threading.current_thread().name)
        if threading.current_thread().name.startswith("rebasin-assign"):
            raise RuntimeError("solver failed")
        return solve(*args, **kw)

    monkeypatch.setattr(weight, "solve_unit", failing)
    with pytest.raises(RuntimeError, match="solver failed"):
        weight.weight_matching(a, b, spec, backend="scipy", workers=3)
    assert any(n.startswith("rebasin-assign") for n in calls)
    alive = [t.name for t in threading.enumerate() if t.name.startswith(("rebasin-assign", "rebasin-costs"))]
    assert alive == []


def test_a_dry_run_counts_the_sweeps_of_products_a_run_takes() -> None:
    """Where the first sweep goes by reach (a sweep of products of at least REACH_FIRST_WORK
    multiply-adds, twice that in flops), later sweeps pay only for what moved: 1.5 sweeps of
    products per run; below it, EXPECTED_SWEEPS."""
    from rebasin.matching.methods import EXPECTED_SWEEPS, WeightMatching
    from rebasin.matching.weight import REACH_FIRST_WORK, REACH_SWEEPS

    wm = WeightMatching(restarts=2)
    assert wm.planned_sweeps(False, 2 * REACH_FIRST_WORK) == 2 * REACH_SWEEPS < 2 * EXPECTED_SWEEPS
    assert wm.planned_sweeps(False, REACH_FIRST_WORK) == 2 * EXPECTED_SWEEPS
