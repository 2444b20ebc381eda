"""Method auto: the best candidate on the criterion it reports, deterministic, data-free fallback;
data costs judged with batch statistics on BatchNorm nets."""

from __future__ import annotations

import torch

from rebasin.evaluate.metrics import activation_features, task_loss_fns
from rebasin.evaluate.repair import reset_batchnorm
from rebasin.matching.methods import AutoMatch
from rebasin.matching.registry import CallableData, MatchProblem
from rebasin.models import build_model
from rebasin.permutation import permute
from rebasin.spec import infer_spec


def _problem(budget_model: str = "mlp") -> tuple[MatchProblem, CallableData]:
    kw = {"in_features": 8, "hidden": 24, "depth": 2}
    torch.manual_seed(0)
    a = build_model(budget_model, **kw).state_dict()
    torch.manual_seed(1)
    b = build_model(budget_model, **kw).state_dict()
    spec = infer_spec(a)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    make = lambda: build_model(budget_model, **kw).eval()  # noqa: E731
    task_loss, score = task_loss_fns(make, a, x, y, batch_size=32)
    data = CallableData(activation_features(make, spec, x, source="t", model_name="mlp"), task_loss, score, 3)
    return MatchProblem(a, b, spec, data, seed=2), data


def test_auto_keeps_its_best_candidate_and_reports_them_all() -> None:
    problem, data = _problem()
    result = AutoMatch(budget=30.0).match(problem)
    rows = result.options["candidates"]
    assert [r["method"] for r in rows][:2] == ["none", "weight"]
    assert {"activation", "ste", "sinkhorn (mid)"} <= {r["method"] for r in rows}
    best = min(rows, key=lambda r: r["score"])
    assert [r for r in rows if r["chosen"]] == [best]
    assert result.options["chosen"] == best["method"]
    assert result.objective == best["score"] <= result.objective_identity
    assert result.objective_identity == rows[0]["score"]
    # the score reported is the midpoint loss of the permutation returned
    pb = permute(problem.b, problem.spec, result.perm)
    mid = {k: 0.5 * (problem.a[k].float() + pb[k].float()) for k in problem.a}
    assert data.score()(mid) == result.objective
    assert not result.maximize and result.improved()


def test_auto_is_deterministic_and_skips_what_does_not_fit() -> None:
    problem, _ = _problem()
    r1 = AutoMatch(budget=0.001).match(problem)
    r2 = AutoMatch(budget=0.001).match(problem)
    assert all(torch.equal(r1.perm[g], r2.perm[g]) for g in r1.perm)
    assert [r["method"] for r in r1.options["candidates"]] == [r["method"] for r in r2.options["candidates"]]
    assert [s.split(" (")[0] for s in r1.options["skipped"]] == ["ste", "sinkhorn"]


def test_auto_without_data_is_weight_matching_with_restarts() -> None:
    problem, _ = _problem()
    problem.data = None
    result = AutoMatch().match(problem)
    assert result.method == "auto" and result.maximize
    assert result.options["restarts"] == 3
    assert result.objective == max(t.objective for t in result.restarts)
    # the report lists every run it counts, and points at the one kept
    assert len(result.restarts) == 3
    assert result.restarts[result.best_restart].objective == result.objective


def test_batch_statistics_score_equals_a_batchnorm_reset() -> None:
    """On a BatchNorm net, the data costs' score is the loss after recomputing the statistics
    on the scored examples, as the barrier is measured."""
    kw = {"in_features": 8, "hidden": 16, "depth": 2, "norm": "bn"}
    torch.manual_seed(0)
    model = build_model("mlp", **kw)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k] * 50  # stored statistics far from the data's
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 10, (200,), generator=g)
    make = lambda: build_model("mlp", **kw).eval()  # noqa: E731
    _, score = task_loss_fns(make, state, x, y, batch_stats=True)
    _, stored = task_loss_fns(make, state, x, y)
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    m = make()
    m.load_state_dict(state)
    reset_batchnorm(m, x, batch_size=len(x))
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(m(x), y))
    assert abs(score(floats) - want) < 1e-3 * want
    assert abs(stored(floats) - want) > 1e-2
