"""Activation matching and MergeMany on trained models, and their command lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import expect_error, run, train_seed
from safetensors.torch import load_file

from rebasin.checkpoint import load_checkpoint
from rebasin.matching import MergeMany
from rebasin.merge import average
from rebasin.permutation import permute, random_permutation
from rebasin.spec import infer_spec

ARGS = {"in_features": 40, "hidden": 128, "depth": 2, "num_classes": 10}


@pytest.fixture(scope="session")
def trained_trio(trained_mlp_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from rebasin.commands.train import train_checkpoint

    p = tmp_path_factory.mktemp("trio") / "mlp2.safetensors"
    train_checkpoint("mlp", ARGS, "mnist1d", p, seed=train_seed(2), epochs=8)
    return [*trained_mlp_pair, p]


def test_merge_many_never_ends_farther_from_the_mean(trained_trio: list[Path]) -> None:
    """MergeMany's own criterion (the summed distance to the mean) never ends above its start;
    how much better the merged model scores than the naive average is a figure of the trio
    (benchmarks/bench_trained_pairs.py)."""
    states = [load_checkpoint(p).state for p in trained_trio]
    spec = infer_spec(states[0])
    result = MergeMany(seed=0).match(states, spec)
    assert result.distance_after <= result.distance_before
    assert result.distance_after == min(result.distance_per_round)
    aligned = [permute(s, spec, p) for s, p in zip(states, result.perms, strict=True)]
    merged = average(aligned)
    assert set(merged) == set(states[0])


def test_merge_many_recovers_planted_permutations(trained_mlp_pair: tuple[Path, Path]) -> None:
    a = dict(load_checkpoint(trained_mlp_pair[0]).state)
    spec = infer_spec(a)
    perms = [random_permutation(spec, s) for s in (1, 2, 3)]
    states = [a] + [dict(permute(a, spec, p)) for p in perms]
    result = MergeMany(seed=0).match(states, spec)
    # every model lands on a common ordering: aligned copies are identical
    aligned = [dict(permute(s, spec, p)) for s, p in zip(states, result.perms, strict=True)]
    for s in aligned[1:]:
        for k in a:
            assert torch.equal(s[k], aligned[0][k]), k
    assert result.distance_after == pytest.approx(0.0, abs=1e-4)


def test_activation_method_from_the_command_line(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    code, stdout, err = run("barrier", a, b, "--method", "activation", "--alphas", "5", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    m = report["match"]  # one exact assignment per group: never below B as it is
    assert m["direction"] == "max" and m["objective"] >= m["objective_identity"] - 1e-9 * abs(
        m["objective_identity"]
    )
    ev = report["evaluation"]["paths"]
    assert ev["aligned"]["loss"]["test"][-1] == pytest.approx(ev["naive"]["loss"]["test"][-1], rel=1e-5)
    out = tmp_path / "m.safetensors"
    code, _, err = run("merge", a, b, "-o", out, "--method", "activation")
    assert code == 0, err
    assert "activation matching" in err


def test_data_driven_method_without_data(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors", "--method", "activation"],
        f"{a}: method 'activation' needs data to run both models on: pass --data (mnist1d, digits, "
        "synthetic, a .safetensors/.npz file, or MODULE:FUNCTION)",
    )
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors", "--method", "activation", "--data", "mnist1d"],
        f"{a}: method 'activation' runs the models: pass --model NAME or MODULE:FACTORY "
        "(the checkpoint records no architecture)",
    )
    assert not (tmp_path / "o.safetensors").exists()


def test_merge_many_command(trained_trio: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "mm.safetensors"
    code, stdout, err = run("merge-many", *trained_trio, "-o", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert len(report["inputs"]) == 3
    assert len(report["merge_many"]["moved_fraction"]) == 3
    assert report["merge_many"]["distance_after"] <= report["merge_many"]["distance_before"]
    assert report["equivalence"]["ok"] is True  # every model's permutation, checked
    merged = load_file(out)
    assert set(merged) == set(load_file(trained_trio[0]))
    expect_error(
        ["merge-many", trained_trio[0], "-o", tmp_path / "x.safetensors"],
        "merge-many needs at least two checkpoints",
    )


def test_every_method_improves_its_own_criterion(trained_mlp_pair: tuple[Path, Path]) -> None:
    """Guarantees only: each method ends no worse than B as it is on its own criterion (the
    objective it reports, in its direction), and its aligned path ends at B's own loss. How far
    its barrier falls below the naive one, and which method wins, are benchmark questions
    (benchmarks/bench_methods.py): they differ between CPUs."""
    a, b = trained_mlp_pair
    for method, extra in (
        ("weight", []),
        ("activation", []),
        ("sinkhorn", ["--steps", "100"]),
        ("sinkhorn-mid", ["--cost", "mid", "--steps", "100"]),
        ("ste", ["--steps", "40"]),
        ("ste-reinmax", ["--estimator", "reinmax", "--steps", "40"]),
    ):
        code, stdout, err = run(
            "barrier", a, b, "--method", method.split("-")[0], *extra, "--alphas", "5", "--json"
        )
        assert code == 0, err
        report = json.loads(stdout)
        m = report["match"]
        if m["direction"] == "max":
            assert m["objective"] >= m["objective_identity"] - 1e-9 * abs(m["objective_identity"]), method
        else:
            assert m["objective"] <= m["objective_identity"] + 1e-9 * abs(m["objective_identity"]), method
        if method.startswith("ste"):
            assert m["options"]["midpoint_loss_best"] <= m["options"]["midpoint_loss_start"], method
        paths = report["evaluation"]["paths"]
        end = paths["aligned"]["loss"]["test"][-1]
        assert end == pytest.approx(paths["naive"]["loss"]["test"][-1], rel=1e-5), method


@pytest.mark.parametrize(
    ("method", "what"), [("ste", "method 'ste'"), ("sinkhorn", "method 'sinkhorn' with cost 'mid'")]
)
def test_data_driven_methods_need_data(
    mlp_pair: tuple[Path, Path], tmp_path: Path, method: str, what: str
) -> None:
    a, b = mlp_pair
    extra = ["--cost", "mid"] if method == "sinkhorn" else []
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors", "--method", method, *extra],
        f"{a}: {what} needs data to run both models on: pass --data (mnist1d, digits, "
        "synthetic, a .safetensors/.npz file, or MODULE:FUNCTION)",
    )


@pytest.mark.parametrize("method", [["sinkhorn", "--cost", "mid"], ["ste"]])
def test_task_loss_methods_on_batchnorm_models(trained_bn_pair: tuple[Path, Path], method: list[str]) -> None:
    """On a BatchNorm net the data costs run, and never end worse than B as it is on the midpoint
    loss they report (their own criterion)."""
    a, b = trained_bn_pair
    code, stdout, err = run("barrier", a, b, "--method", *method, "--steps", "10", "--alphas", "3", "--json")
    assert code == 0, err
    m = json.loads(stdout)["match"]
    assert m["direction"] == "min"
    assert m["objective"] <= m["objective_identity"] + 1e-9


def test_estimator_applies_to_ste_only(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    expect_error(
        ["merge", a, b, "-o", tmp_path / "m.safetensors", "--estimator", "reinmax"],
        "--estimator does not apply to method 'auto' (used by: ste)",
    )
    assert not (tmp_path / "m.safetensors").exists()


def test_ste_epochs_set_the_number_of_steps(trained_mlp_pair: tuple[Path, Path]) -> None:
    a, b = trained_mlp_pair
    code, stdout, err = run("barrier", a, b, "--method", "ste", "--epochs", "1", "--alphas", "3", "--json")
    assert code == 0, err
    assert json.loads(stdout)["match"]["options"]["steps"] == 16  # 4000 MNIST-1D examples / 256
