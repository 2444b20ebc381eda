"""Sinkhorn re-basin: the implicit gradient, planted recovery with the data-free cost."""

from __future__ import annotations

import pytest
import torch

from rebasin.matching import match
from rebasin.matching.projection import ImplicitSinkhorn, sinkhorn, soft_permute
from rebasin.models import build_model
from rebasin.permutation import invert, permute, random_permutation
from rebasin.spec import infer_spec


def test_sinkhorn_is_doubly_stochastic() -> None:
    p = sinkhorn(torch.randn(6, 6, dtype=torch.float64) * 3, iters=2000, tol=1e-13)
    torch.testing.assert_close(p.sum(0), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(p.sum(1), torch.ones(6, dtype=torch.float64))


def test_implicit_gradient_matches_finite_differences_and_unrolled() -> None:
    torch.manual_seed(0)
    n = 5
    s = torch.randn(n, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n, n, dtype=torch.float64)
    (ImplicitSinkhorn.apply(s, 3000) * g).sum().backward()
    implicit = s.grad.clone()
    eps = 1e-6
    fd = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            d = torch.zeros(n, n, dtype=torch.float64)
            d[i, j] = eps
            plus = (sinkhorn(s.detach() + d, 5000, 1e-14) * g).sum()
            minus = (sinkhorn(s.detach() - d, 5000, 1e-14) * g).sum()
            fd[i, j] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(implicit, fd, atol=1e-7, rtol=1e-5)
    s2 = s.detach().clone().requires_grad_(True)
    log_p = s2
    for _ in range(3000):
        log_p = log_p - torch.logsumexp(log_p, 1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, 0, keepdim=True)
    (log_p.exp() * g).sum().backward()
    torch.testing.assert_close(implicit, s2.grad, atol=1e-8, rtol=1e-6)


def test_soft_permute_with_hard_matrices_is_permute() -> None:
    torch.manual_seed(0)
    a = build_model("mlp", in_features=6, hidden=5, depth=2).state_dict()
    spec = infer_spec(a)
    p = random_permutation(spec, 1)
    hard = {g: torch.eye(len(v))[v] for g, v in p.items()}
    want = permute(a, spec, p)
    for k in spec.params:
        torch.testing.assert_close(soft_permute(a[k], spec.axes_to_perm[k], hard), want[k])


@pytest.mark.parametrize(
    ("name", "kw"), [("mlp", {"in_features": 12, "hidden": 24, "depth": 3}), ("resnet20", {})]
)
def test_l2_cost_recovers_planted_permutation(name: str, kw: dict) -> None:
    torch.manual_seed(0)
    a = build_model(name, **kw).state_dict()
    spec = infer_spec(a)
    p = random_permutation(spec, 3)
    b = dict(permute(a, spec, p))
    r = match(a, b, spec, "sinkhorn", cost="l2", steps=100)
    want = invert(p)
    for g in spec.sizes:
        assert torch.equal(r.perm[g], want[g]), g
    assert r.objective == pytest.approx(0.0, abs=1e-4)  # minus the L2 distance after alignment


def test_a_stack_of_groups_is_projected_and_differentiated_as_each_alone() -> None:
    torch.manual_seed(1)
    s = torch.randn(3, 7, 7, dtype=torch.float64) * 4
    g = torch.randn(3, 7, 7, dtype=torch.float64)
    stacked = s.clone().requires_grad_(True)
    (ImplicitSinkhorn.apply(stacked, 3000, 1e-12) * g).sum().backward()
    for i in range(3):
        one = s[i].clone().requires_grad_(True)
        p = ImplicitSinkhorn.apply(one, 3000, 1e-12)
        (p * g[i]).sum().backward()
        torch.testing.assert_close(sinkhorn(s, 3000, 1e-12)[i], p.detach())
        torch.testing.assert_close(stacked.grad[i], one.grad, atol=1e-9, rtol=1e-7)


def test_low_temperatures_stay_finite() -> None:
    """Logits over a huge range (tau -> 0) neither overflow nor return NaN."""
    torch.manual_seed(2)
    s = torch.randn(2, 64, 64) * 2000
    p = sinkhorn(s, 500, 1e-4)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-2), torch.ones(2, 64), atol=1e-4, rtol=0)
