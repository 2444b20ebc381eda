"""Every failure is one line: user hooks that raise or do not import, devices, out-of-range and
non-finite values, data that does not add up; batch items fail alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import expect_error, run


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    f = tmp_path / "hooks.py"
    f.write_text(
        "def boom(**kw):\n    raise RuntimeError('no GPU here\\nsecond line')\n"
        "def not_a_model(**kw):\n    return 3\n"
        "def data_boom():\n    raise ValueError('bad split')\n"
    )
    (tmp_path / "broken.py").write_text("def f(:\n")
    return f


def test_model_hook_that_raises(mlp_pair: tuple[Path, Path], hooks: Path) -> None:
    a, b = mlp_pair
    expect_error(
        ["barrier", a, b, "--model", f"{hooks}:boom", "--data", "synthetic"],
        f"the model factory '{hooks}:boom' failed (RuntimeError: no GPU here)",
    )
    expect_error(
        ["barrier", a, b, "--model", f"{hooks}:not_a_model", "--data", "synthetic"],
        f"the model factory '{hooks}:not_a_model' returned a int, not a torch.nn.Module",
    )


def test_hook_with_a_syntax_error(mlp_pair: tuple[Path, Path], hooks: Path) -> None:
    a, b = mlp_pair
    broken = hooks.parent / "broken.py"
    code, _, err = run("barrier", a, b, "--model", f"{broken}:f", "--data", "synthetic")
    assert code == 2
    assert err.startswith(f"error: {broken}:f: importing '{broken}' failed (SyntaxError: ")
    assert len(err.splitlines()) == 1


def test_data_hook_that_raises(trained_mlp_pair: tuple[Path, Path], hooks: Path) -> None:
    a, b = trained_mlp_pair
    expect_error(
        ["barrier", a, b, "--data", f"{hooks}:data_boom"],
        f"the data hook '{hooks}:data_boom' failed (ValueError: bad split)",
    )


@pytest.mark.parametrize(
    ("device", "line"),
    [
        ("bogus", "--device 'bogus' is not a device (use cpu, cuda, cuda:N or mps)"),
        ("cuda", "--device cuda: no CUDA GPU is available (this torch build or machine has none)"),
    ],
)
def test_devices(mlp_pair: tuple[Path, Path], tmp_path: Path, device: str, line: str) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    a, b = mlp_pair
    expect_error(["merge", a, b, "-o", tmp_path / "m.safetensors", "--device", device], line)
    assert not (tmp_path / "m.safetensors").exists()


def test_assignments_at_once_are_counted_from_zero(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    out = tmp_path / "m.safetensors"
    args = ["merge", a, b, "-o", out, "--method", "weight", "--assign-workers", "-1"]
    expect_error(args, "--assign-workers must be at least 0, got -1")
    assert not out.exists()
    for backend in ("lap", "scipy"):  # LAPJV in worker processes, scipy in threads
        args = ["merge", a, b, "-o", out, "--method", "weight", "--backend", backend, "--assign-workers", "2"]
        code, _, err = run(*args, "--quiet", "--force")
        assert code == 0, err


def test_max_barrier_must_be_finite(trained_mlp_pair: tuple[Path, Path]) -> None:
    a, b = trained_mlp_pair
    expect_error(
        ["barrier", a, b, "--data", "mnist1d", "--max-barrier", "nan"],
        "--max-barrier must be a finite number, got nan",
    )


def _data(tmp_path: Path, **arrays: np.ndarray) -> Path:
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)  # type: ignore[arg-type]
    return p


def test_rows_of_x_and_y_must_match(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    p = _data(tmp_path, x=np.zeros((100, 40), np.float32), y=np.zeros(50, np.int64))
    expect_error(["barrier", a, b, "--data", p], f"{p}: 'x' has 100 rows but 'y' has 50; they must match")


def test_non_finite_data(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    x = np.zeros((20, 40), np.float32)
    x[3, 4] = np.nan
    p = _data(tmp_path, x=x, y=np.zeros(20, np.int64))
    expect_error(["barrier", a, b, "--data", p], f"{p}: array 'x' holds NaN or Inf values")


def test_non_finite_barrier_fails_its_gate(tmp_path: Path) -> None:
    from rebasin.commands import gate

    assert gate(float("nan"), 1.0) == "test loss barrier is nan (the path's loss is not finite)"
    assert gate(float("inf"), 1.0) is not None
    assert gate(0.5, 1.0) is None
    assert gate(float("nan"), None) is None


def test_plan_with_negative_steps(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"format_version: 1\nitems:\n  - {{name: x, a: {a}, b: {b}, data: synthetic, method: ste, steps: -5}}\n"
    )
    expect_error(["batch", plan], f"{plan}: item 'x': 'steps' must be at least 1, got -5")


def test_batch_goes_on_past_user_code_that_raises(
    trained_mlp_pair: tuple[Path, Path], hooks: Path, tmp_path: Path
) -> None:
    a, b = trained_mlp_pair
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "format_version: 1\ndefaults: {alphas: 3}\nitems:\n"
        f"  - {{name: hooked, a: {a}, b: {b}, data: '{hooks}:data_boom'}}\n"
        f"  - {{name: fine, a: {a}, b: {b}, data: mnist1d}}\n"
    )
    code, stdout, err = run("batch", plan, "--allow-code", "--jsonl")
    assert code == 1, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert rows[0]["error"] == f"the data hook '{hooks}:data_boom' failed (ValueError: bad split)"
