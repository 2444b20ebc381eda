"""Every registered entry is tested by being registered: matchers, models, data sets, spec families."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from cases import CASES, Case

from rebasin.core.errors import ConfigError
from rebasin.core.registry import Registry
from rebasin.data import list_data, load_data
from rebasin.evaluate.metrics import activation_features, task_loss_fns
from rebasin.matching.registry import MATCHERS, CallableData, Matcher, MatchProblem
from rebasin.models import build_model, list_models
from rebasin.options import options_of
from rebasin.permutation import permute, random_permutation
from rebasin.spec import infer_spec


def configurations() -> list[Matcher]:
    """Each registered matcher with its defaults, and once per other value of each choice option
    (Sinkhorn's data costs, ReinMax), with few steps where the method takes steps."""
    out = []
    for _, cls in MATCHERS.items():
        variants: list[dict[str, Any]] = [{}]
        for info in options_of(cls, "match"):
            if info.choices and info.name != "backend":
                variants += [{info.name: c} for c in info.choices if c != info.default]
        names = {f.name for f in dataclasses.fields(cls)}
        for v in variants:
            m = cls(**v)
            if "steps" in names:  # fewer steps: tests guarantees, not quality
                m = cls(**v, steps=6 if m.needs_data() else 60)
            if "budget" in names:  # auto's cheap candidates only (its data costs are tested apart)
                m = cls(**v, budget=0.001)
            out.append(m)
    return out


CONFIGS = configurations()


def _id(m: Matcher) -> str:
    return m.describe().replace(" ", "")


@pytest.mark.parametrize("matcher", [m for m in CONFIGS if not m.needs_data()], ids=_id)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_data_free_matchers_recover_planted_permutations(matcher: Matcher, case: Case) -> None:
    """pi(permute(A, p)) == A exactly, on every spec family."""
    state = case.make(0).state_dict()
    spec = infer_spec(state)
    b = dict(permute(state, spec, random_permutation(spec, 7)))
    result = matcher.match(MatchProblem(state, b, spec, seed=1))
    back = permute(b, spec, result.perm)
    for k in spec.params:
        assert torch.equal(back[k], state[k]), (matcher.describe(), case.id, k)
    assert result.improved()


def _data_side(case: Case, a: dict[str, torch.Tensor], spec: Any) -> CallableData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, *case.input_shape[1:], generator=g)
    out = case.make(0)(x[:2])
    y = torch.randint(0, out.shape[-1], (64,), generator=g)
    task_loss, score = task_loss_fns(lambda: case.build().eval(), a, x, y, batch_size=16)
    features = activation_features(lambda: case.build().eval(), spec, x, source="test", model_name=case.id)
    return CallableData(features, task_loss, score, epoch_batches=4)


@pytest.mark.parametrize("matcher", [m for m in CONFIGS if m.wants_data()], ids=_id)
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.id in ("mlp-sequential", "resnet20-bn")], ids=lambda c: c.id
)
def test_data_driven_matchers_never_end_worse_than_their_start(matcher: Matcher, case: Case) -> None:
    """On the criterion each reports (its objective, in its direction), the result is at least as
    good as B as it is."""
    a, b = case.make(0).state_dict(), case.make(1).state_dict()
    spec = infer_spec(a)
    problem = MatchProblem(a, b, spec, _data_side(case, a, spec), seed=0)
    result = matcher.match(problem)
    assert result.objective_name
    assert result.improved(), (result.objective_identity, result.objective)
    assert result.converged is None or isinstance(result.converged, bool)


@pytest.mark.parametrize("matcher", [m for m in CONFIGS if m.needs_data()], ids=_id)
def test_data_driven_matchers_without_data_say_so(matcher: Matcher) -> None:
    state = CASES[0].make(0).state_dict()
    with pytest.raises(ConfigError, match="needs data"):
        matcher.match(MatchProblem(state, state, infer_spec(state)))


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_its_names_infer_a_spec(name: str) -> None:
    model = build_model(name)
    assert infer_spec(model.state_dict()).sizes


@pytest.mark.parametrize("name", list_data())
def test_every_data_set_loads(name: str) -> None:
    d = load_data(name)
    assert len(d.y_train) and len(d.y_test) and d.num_classes >= 2


def test_registry_refuses_duplicates_and_suggests() -> None:
    r: Registry[int] = Registry("colour")
    r.add("red", 1)
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        r.add("red", 2)
    with pytest.raises(ConfigError) as e:
        r.get("rad")
    assert e.value.message == "unknown colour 'rad' (known: red)"
    assert e.value.hint == "did you mean 'red'?"
