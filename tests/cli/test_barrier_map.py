"""``rebasin barrier M1 M2 ... Mn``: the pairwise map equals the separate barrier runs, is
symmetric with zeros on its diagonal, groups basins, plots, gates and refuses bad calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import expect_error, run, train_seed

from rebasin.commands.barrier_map import basins

FAST = ("--data", "mnist1d", "--alphas", "5", "--max-train", "500")


@pytest.fixture(scope="module")
def three(trained_mlp_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The session's trained pair and a third model of the same recipe."""
    from rebasin.commands.train import train_checkpoint

    p = tmp_path_factory.mktemp("third") / "mlp2.safetensors"
    args = {"in_features": 40, "hidden": 128, "depth": 2, "num_classes": 10}
    train_checkpoint("mlp", args, "mnist1d", p, seed=train_seed(2), epochs=8)
    return [*trained_mlp_pair, p]


def barrier_of(a: Path, b: Path, *extra: str) -> tuple[float, float]:
    code, out, err = run("barrier", a, b, *FAST, "--json", *extra)
    assert code == 0, err
    paths = json.loads(out)["evaluation"]["paths"]
    return tuple(paths[p]["barriers"]["test"]["loss"]["linear"] for p in ("naive", "aligned"))  # type: ignore[return-value]


def test_the_map_is_symmetric_with_zeros_and_equals_separate_runs(three: list[Path]) -> None:
    code, out, err = run("barrier", *three, *FAST, "--json", "--method", "weight")
    assert code == 0, err
    m = json.loads(out)["map"]
    n = len(three)
    for matrix in (m["naive"], m["aligned"]):
        assert all(matrix[i][i] == 0.0 for i in range(n))
        assert all(matrix[i][j] == matrix[j][i] for i in range(n) for j in range(n))
    for i in range(n):
        for j in range(i + 1, n):
            naive, aligned = barrier_of(three[i], three[j], "--method", "weight")
            assert m["naive"][i][j] == naive
            assert m["aligned"][i][j] == aligned
    assert m["basins"] == basins(m["aligned"], m["basin_threshold"])


def test_basins_are_the_components_below_the_threshold() -> None:
    matrix = [
        [0.0, 0.05, 0.9, 0.9],
        [0.05, 0.0, 0.9, 0.08],
        [0.9, 0.9, 0.0, 0.9],
        [0.9, 0.08, 0.9, 0.0],
    ]
    assert basins(matrix, 0.1) == [[0, 1, 3], [2]]
    assert basins(matrix, 0.06) == [[0, 1], [2], [3]]
    assert basins(matrix, 1.0) == [[0, 1, 2, 3]]
    assert basins(matrix, 0.0) == [[0], [1], [2], [3]]


def test_reference_coordinates_plot_and_report(three: list[Path], tmp_path: Path) -> None:
    plot, report = tmp_path / "map.png", tmp_path / "map.json"
    args = ("--method", "weight", "--reference", three[0], "--plot", plot, "--report", report)
    code, out, err = run("barrier", *three, *FAST, *args)
    assert code == 0, err
    assert "M1" in out and "basins (barrier below 0.1)" in out
    assert plot.exists() and plot.with_suffix(".svg").exists()
    m = json.loads(report.read_text())["map"]
    assert m["reference"] == str(three[0])
    for j in (1, 2):  # a pair with the reference is that pair's plain aligned barrier
        assert m["aligned"][0][j] == barrier_of(three[0], three[j], "--method", "weight")[1]
    assert all(m["aligned"][i][i] == 0.0 for i in range(3))


def test_the_gate_takes_the_largest_barrier(three: list[Path]) -> None:
    code, out, _ = run("barrier", *three, *FAST, "--method", "none", "--json")
    assert code == 0
    m = json.loads(out)["map"]
    assert m["aligned"] is None
    largest = max(max(row) for row in m["naive"])
    code, _, err = run("barrier", *three, *FAST, "--method", "none", "--max-barrier", str(largest / 2))
    assert code == 1
    assert f"test loss barrier {largest:.4f} > --max-barrier" in err


def test_bad_calls_are_one_line(three: list[Path]) -> None:
    expect_error(["barrier", three[0], *FAST], "barrier takes two checkpoints, or more for the pairwise map")
    expect_error(
        ["barrier", three[0], three[1], *FAST, "--reference", three[0]],
        "--reference applies to three or more models",
        "drop it, or add models",
    )
    expect_error(
        ["barrier", *three, *FAST, "--dry-run"], "--dry-run plans one pair", "run it on two of the models"
    )
    expect_error(
        ["barrier", three[0], three[1], three[0], *FAST],
        "a model is named twice",
        "give each checkpoint once",
    )
