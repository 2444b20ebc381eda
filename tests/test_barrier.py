"""Barrier metrics on hand-made curves, one interpolation routine, and the guarantees that hold on
real trained pairs (what a pair reaches is a figure: benchmarks/bench_trained_pairs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rebasin.checkpoint import load_checkpoint
from rebasin.core.errors import ConfigError
from rebasin.data import load_data
from rebasin.evaluate.paths import BarrierCurve, PathEvaluator, alpha_grid, barrier_metrics
from rebasin.matching import match
from rebasin.models import build_model
from rebasin.permutation import permute, random_permutation
from rebasin.spec import infer_spec


def test_barrier_definitions_on_hand_made_curves() -> None:
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    # a flat line has no barrier
    assert barrier_metrics(alphas, [1.0] * 5) == {"linear": 0.0, "mean": 0.0}
    # a bump of 2 above both ends at the midpoint
    assert barrier_metrics(alphas, [1.0, 2.0, 3.0, 2.0, 1.0]) == {"linear": 2.0, "mean": 2.0}
    # unequal ends: the linear baseline and the endpoint mean differ
    b = barrier_metrics(alphas, [0.0, 1.0, 1.0, 2.0, 2.0])
    assert b["linear"] == pytest.approx(0.5)  # at 0.25: 1.0 - 0.5
    assert b["mean"] == pytest.approx(1.0)  # at 0.75 / 1.0: 2.0 - 1.0
    # a convex path (below the line) has barrier 0 under the linear definition (its endpoints)
    assert barrier_metrics(alphas, [1.0, 0.5, 0.2, 0.5, 1.0])["linear"] == 0.0


def test_curve_barriers_use_error_for_accuracy() -> None:
    c = BarrierCurve(
        [0.0, 0.5, 1.0],
        {"train": [0.1, 0.6, 0.1], "test": [0.2, 0.2, 0.2]},
        {"train": [0.9, 0.5, 0.9], "test": [0.8, 0.8, 0.8]},
    )
    b = c.barriers()
    assert b["train"]["loss"]["linear"] == pytest.approx(0.5)
    assert b["train"]["error"]["linear"] == pytest.approx(0.4)
    assert b["test"]["error"]["mean"] == pytest.approx(0.0)
    assert c.at(0.5, "train") == (0.6, 0.5)


def test_alpha_grid_contains_midpoint() -> None:
    g = alpha_grid(25)
    assert g[0] == 0.0 and g[-1] == 1.0 and 0.5 in g and len(g) == 25
    with pytest.raises(ConfigError, match="--alphas must be at least 2, got 1"):
        alpha_grid(1)


def _evaluator(path: Path, bn: str = "none") -> PathEvaluator:
    from rebasin.models.resolve import resolve_model

    ck = load_checkpoint(path)
    ref = resolve_model(None, None, ck.metadata, str(path))
    return PathEvaluator(ref.factory(), load_data(ck.metadata["rebasin.data"]), bn=bn, model_name=ref.name)


def test_aligned_path_of_a_trained_pair(trained_mlp_pair: tuple[Path, Path]) -> None:
    """Guarantees only (how far the aligned barrier falls below the naive one is a figure of
    this pair on this CPU: benchmarks/bench_trained_pairs.py prints it)."""
    a, b = (load_checkpoint(p) for p in trained_mlp_pair)
    ev = _evaluator(trained_mlp_pair[0])
    spec = infer_spec(a.shapes)
    result = match(a.state, b.state, spec, restarts=3)
    assert result.improved()  # never worse than B as it is, on its own criterion
    grid = alpha_grid(11)
    naive = ev.curve(a.state, b.state, grid)
    aligned = ev.curve(a.state, permute(b.state, spec, result.perm), grid)
    # the endpoints are the same models on both paths: pi(B) computes what B computes
    for split in ("train", "test"):
        assert naive.loss[split][0] == aligned.loss[split][0]
        assert naive.acc[split][0] == aligned.acc[split][0]
        assert naive.loss[split][-1] == pytest.approx(aligned.loss[split][-1], rel=1e-5)
    # barriers are never negative, and zero at a flat path
    for curve in (naive, aligned):
        for split in curve.barriers().values():
            assert all(v >= 0.0 for kind in split.values() for v in kind.values())


def test_permuted_endpoint_gives_flat_path(trained_mlp_pair: tuple[Path, Path]) -> None:
    a = load_checkpoint(trained_mlp_pair[0])
    spec = infer_spec(a.shapes)
    planted = random_permutation(spec, 3)
    pa = dict(permute(a.state, spec, planted))
    ev = _evaluator(trained_mlp_pair[0])
    result = match(a.state, pa, spec)
    # exact recovery of the planted permutation: pi(permuted A) is A, so the path is flat
    back = dict(permute(pa, spec, result.perm))
    assert all(torch.equal(back[k], a.state[k]) for k in a.state)
    aligned = ev.curve(a.state, back, alpha_grid(5))
    assert max(aligned.barriers()["test"]["loss"].values()) < 1e-5


def test_bn_reset_recomputes_the_statistics_of_every_point(trained_bn_pair: tuple[Path, Path]) -> None:
    """At every alpha, a reset gives the interpolated model the statistics of the training data
    (exact averages over one pass), and the curve's point is the merged checkpoint's own score.
    How much the reset helps the midpoint is a figure (benchmarks/bench_trained_pairs.py)."""
    a, b = (load_checkpoint(p) for p in trained_bn_pair)
    spec = infer_spec(a.shapes)
    pb = dict(permute(b.state, spec, match(a.state, b.state, spec).perm))
    reset = _evaluator(trained_bn_pair[0], "reset")
    mid = reset.merged_state(a.state, pb, 0.5)
    x = reset.data.x_train
    w = 0.5 * (a.state["net.0.weight"] + pb["net.0.weight"])
    bias = 0.5 * (a.state["net.0.bias"] + pb["net.0.bias"])
    pre = torch.nn.functional.linear(x, w, bias).double()  # the first BatchNorm's input
    assert len(x) % 500 == 0  # whole batches: the average of batch means is the data's mean
    assert torch.allclose(mid["net.1.running_mean"].double(), pre.mean(0), rtol=1e-4, atol=1e-4)
    # the reset curve's midpoint is what the reset checkpoint scores in eval mode
    point = reset.curve(a.state, pb, [0.5]).loss["test"][0]
    plain = _evaluator(trained_bn_pair[0], "none")
    assert plain.curve(mid, mid, [0.0]).loss["test"][0] == pytest.approx(point, rel=1e-6)
    # REPAIR runs on the same pair and keeps the architecture
    repaired = _evaluator(trained_bn_pair[0], "repair").merged_state(a.state, pb, 0.5)
    assert {k: v.shape for k, v in repaired.items()} == {k: v.shape for k, v in mid.items()}


def test_repair_matches_target_statistics() -> None:
    from rebasin.evaluate.repair import channel_stats, repair, repair_targets

    data = load_data("synthetic")
    torch.manual_seed(0)
    m = build_model("mlp", in_features=32, hidden=16, depth=2, num_classes=4).eval()
    targets = repair_targets(m)
    assert targets == ["net.0", "net.2"]
    x = data.x_train[:500]
    zero = {n: (torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64)) for n in targets}
    repair(m, zero, zero, 0.5, x)
    after = channel_stats(m, targets, x)
    for n in targets:
        mean, std = after[n]
        assert torch.allclose(mean, torch.zeros(16, dtype=torch.float64), atol=1e-4)
        assert torch.allclose(std, torch.ones(16, dtype=torch.float64), atol=1e-3)
