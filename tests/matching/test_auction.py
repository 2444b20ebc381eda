"""The auction back-end: exactly LAPJV's optimum on the same costs (continuous costs have one
optimum, so the same permutation), every path of its certificate, and weight matching by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rebasin.matching import assignment, auction, match
from rebasin.matching.assignment import plan_concurrency, solve_assignment
from rebasin.matching.auction import auction_assignment
from rebasin.models import build_model
from rebasin.spec import infer_spec


def _value(c: np.ndarray, p: np.ndarray) -> float:
    return float(c[np.arange(len(c)), p].sum(dtype=np.float64))


def _lap(c: np.ndarray) -> np.ndarray:
    return solve_assignment(c, "lap")


def _auction(c: np.ndarray, stats: dict[str, int] | None = None) -> np.ndarray:
    return auction_assignment(torch.from_numpy(c), stats).numpy()


@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 300])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_same_permutation_as_lapjv_on_gaussian_costs(n: int, dtype: type) -> None:
    c = np.random.default_rng(n).standard_normal((n, n)).astype(dtype)
    assert np.array_equal(_auction(c), _lap(c))


def test_the_same_permutation_on_weight_matching_like_costs() -> None:
    """Low-rank products of two independent layers, and a planted one under noise; at scales far
    from 1 (every eps stays a normal float)."""
    rng = np.random.default_rng(0)
    n, k = 200, 24
    x = rng.standard_normal((n, k))
    independent = x @ rng.standard_normal((n, k)).T
    planted = x @ x[rng.permutation(n)].T + 3.0 * rng.standard_normal((n, n))
    for c in (independent, planted, independent * 1e-200, independent * 1e200, independent + 1e6):
        assert np.array_equal(_auction(c), _lap(c))


def test_ties_give_an_optimum() -> None:
    """Integer costs have many optima: the auction's is one of them (LAPJV's may be another)."""
    c = np.round(np.random.default_rng(1).standard_normal((120, 120)) * 2)
    p = _auction(c)
    assert sorted(p.tolist()) == list(range(120))
    assert _value(c, p) == _value(c, _lap(c))
    assert sorted(_auction(np.zeros((7, 7))).tolist()) == list(range(7))


def test_rows_with_distinct_best_columns_are_read_off() -> None:
    n = 50
    planted = np.random.default_rng(2).permutation(n)
    c = np.random.default_rng(3).standard_normal((n, n))
    c[np.arange(n), planted] += 10.0
    stats: dict[str, int] = {}
    assert np.array_equal(_auction(c, stats), planted)
    assert stats == {}  # no bids


def test_the_certificate_solves_the_tight_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped early (few tight edges per row) or at the last phase, or past the sparse solve's
    size (the whole cost solved on the CPU): the same optimum each way."""
    c = np.random.default_rng(4).standard_normal((150, 150))
    want = _lap(c)
    stats: dict[str, int] = {}
    assert np.array_equal(_auction(c, stats), want)
    assert 150 < stats["tight"] <= auction.TIGHT_PER_ROW * 150
    monkeypatch.setattr(auction, "TIGHT_PER_ROW", 0)  # never early: down to the last eps
    last: dict[str, int] = {}
    assert np.array_equal(_auction(c, last), want)
    assert last["phases"] > stats["phases"]
    monkeypatch.setattr(auction, "SPARSE_MAX", 0)
    past: dict[str, int] = {}
    assert np.array_equal(_auction(c, past), want)
    assert past["tight"] == -1


def test_an_assignment_that_is_its_own_certificate() -> None:
    """Where the assignment's own edges are the only tight ones, it is returned as it is."""
    row_col = torch.tensor([1, 0])
    edges = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([1.0, 1.0]))
    assert auction._certified(2, row_col, edges) is row_col


def test_bad_costs_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        auction_assignment(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        auction_assignment(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    assert auction_assignment(torch.zeros(0, 0)).shape == (0,)


def test_the_back_end_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auction`` solves one at a time; below :data:`AUCTION_MIN` rows, and near a known
    permutation, LAPJV solves here."""
    assert plan_concurrency(0, "auction", 11008, False) == (1, "auction")
    assert plan_concurrency(4, "auction", 11008, True) == (1, "auction")
    calls: list[int] = []
    real = auction.auction_assignment
    monkeypatch.setattr(auction, "auction_assignment", lambda c: calls.append(len(c)) or real(c))
    c = np.random.default_rng(5).standard_normal((40, 40)).astype(np.float32)
    assert np.array_equal(solve_assignment(c, "auction"), _lap(c))
    assert calls == []
    monkeypatch.setattr(assignment, "AUCTION_MIN", 8)
    assert np.array_equal(solve_assignment(c, "auction"), _lap(c))
    assert calls == [40]
    near = _lap(c)  # a re-solve near a known permutation: LAPJV starts from it
    assert np.array_equal(solve_assignment(c, "auction", near), near)
    assert calls == [40]


def test_weight_matching_by_auction_finds_lapjvs_permutations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assignment, "AUCTION_MIN", 2)
    torch.manual_seed(0)
    a = build_model("mlp", in_features=16, hidden=48).state_dict()
    torch.manual_seed(1)
    b = build_model("mlp", in_features=16, hidden=48).state_dict()
    spec = infer_spec(a)
    by_lap = match(a, b, spec, seed=3, backend="lap")
    by_auction = match(a, b, spec, seed=3, backend="auction")
    assert by_auction.options["backend"] == "auction"
    assert by_auction.objective == by_lap.objective
    for g in spec.sizes:
        assert torch.equal(by_auction.perm[g], by_lap.perm[g])


def test_the_auction_solves_on_the_models_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The auction runs where the run's products are: on a CUDA device that device (not the
    current one), anywhere else the CPU (MPS has no float64)."""
    monkeypatch.setattr(assignment, "AUCTION_MIN", 2)
    seen: list[str] = []
    real = auction.auction_assignment
    monkeypatch.setattr(auction, "auction_assignment", lambda c: seen.append(str(c.device)) or real(c))
    c = np.random.default_rng(6).standard_normal((30, 30)).astype(np.float32)
    for device in ("cpu", "mps"):
        assert np.array_equal(solve_assignment(c, "auction", device=device), _lap(c))
    assert seen == ["cpu", "cpu"]
    torch.manual_seed(0)
    a = build_model("mlp", in_features=16, hidden=48).state_dict()
    torch.manual_seed(1)
    b = build_model("mlp", in_features=16, hidden=48).state_dict()
    seen.clear()
    match(a, b, infer_spec(a), seed=3, backend="auction", device="cpu")
    assert seen and set(seen) == {"cpu"}


def test_costs_handled_in_blocks_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows (as a large cost is handled) give the same optimum."""
    monkeypatch.setattr(auction, "CPU_BLOCK", 3 * 97)
    c = np.random.default_rng(8).standard_normal((97, 97))
    assert np.array_equal(_auction(c), _lap(c))
