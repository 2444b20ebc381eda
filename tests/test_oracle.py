"""The oracle, over every registered spec family: a random permutation under the inferred spec
preserves the function; weight matching recovers a planted permutation; merging A with its own
permutation gives A back; merging A with B gives 0.5 (A + pi(B))."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, Case

from rebasin.matching import CallableData, match
from rebasin.merge import interpolate
from rebasin.permutation import invert, permute, random_permutation
from rebasin.spec import infer_spec, list_specs

HF_FAMILIES = {"gpt2", "llama", "bert", "vit"}  # the same oracles, on transformers models: test_hf.py


def test_every_registered_family_has_a_case() -> None:
    assert {f.name for f in list_specs()} <= {c.family for c in CASES} | HF_FAMILIES


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_inferred_family(case: Case) -> None:
    spec = infer_spec(case.make(0).state_dict())
    assert spec.family == case.family


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("seed", [1, 2])
def test_permutation_preserves_function(case: Case, seed: int) -> None:
    model = case.make(0)
    state = model.state_dict()
    spec = infer_spec(state)
    perm = random_permutation(spec, seed)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    permuted = case.make(5)
    permuted.load_state_dict(dict(permute(state, spec, perm)))
    x = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-5)
        # and the weights really moved
        assert not all(torch.equal(state[k], permuted.state_dict()[k]) for k in spec.params)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_weight_matching_recovers_planted_permutation(case: Case) -> None:
    state = case.make(0).state_dict()
    spec = infer_spec(state)
    perm = random_permutation(spec, 7)
    b = dict(permute(state, spec, perm))
    result = match(state, b, spec, restarts=3)
    want = invert(perm)
    for g in spec.sizes:
        assert torch.equal(result.perm[g], want[g]), g
    merged = interpolate(state, permute(b, spec, result.perm), 0.5)
    for k, v in state.items():
        assert torch.equal(merged[k], v), k


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merge_is_mean_of_a_and_permuted_b(case: Case) -> None:
    a = case.make(0).state_dict()
    b = case.make(1).state_dict()
    spec = infer_spec(a)
    result = match(a, b, spec)
    pb = permute(b, spec, result.perm)
    merged = interpolate(a, pb, 0.5)
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(merged[k], 0.5 * (v + pb[k]))
        else:
            assert torch.equal(merged[k], v)
    # pi(B) is a permutation of B: same multiset of values in every tensor
    for k in spec.params:
        assert torch.equal(torch.sort(pb[k].flatten()).values, torch.sort(b[k].flatten()).values)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_activation_matching_recovers_planted_permutation(case: Case) -> None:
    from rebasin.evaluate.metrics import activation_features

    model = case.make(0)
    state = model.state_dict()
    spec = infer_spec(state)
    perm = random_permutation(spec, 11)
    b = dict(permute(state, spec, perm))
    x = torch.cat([case.inputs(s) for s in range(8)])
    features = activation_features(lambda: case.make(3), spec, x, batch_size=7)
    result = match(state, b, spec, "activation", data=CallableData(features_fn=features))
    assert torch.is_grad_enabled()  # collecting activations must not leak no_grad
    want = invert(perm)
    for g in spec.sizes:
        assert torch.equal(result.perm[g], want[g]), g
    assert result.objective == pytest.approx(sum(spec.sizes.values()), rel=1e-6)  # correlations of 1
