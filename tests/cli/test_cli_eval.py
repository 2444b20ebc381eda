"""barrier, merge --data, train, demo and batch from the command line; their bad-input paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import expect_error, no_leftovers, run
from safetensors import safe_open
from safetensors.torch import load_file


def test_barrier_command_writes_plot_and_report(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    plot, rep = tmp_path / "curve.png", tmp_path / "r.json"
    code, stdout, err = run("barrier", a, b, "--alphas", "5", "--plot", plot, "--report", rep)
    assert code == 0, err
    assert stdout == ""
    assert "aligned" in err and "naive" in err and "loss barrier" in err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    report = json.loads(rep.read_text())
    ev = report["evaluation"]
    assert set(ev["paths"]) == {"naive", "aligned"}
    assert ev["paths"]["naive"]["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert ev["model"]["name"] == "mlp" and ev["data"]["name"] == "mnist1d"
    assert ev["bn"] == "none"
    for path in ("naive", "aligned"):  # never negative; how they compare is a figure of the pair
        assert ev["paths"][path]["barriers"]["test"]["loss"]["linear"] >= 0.0


def test_barrier_naive_only_and_json(trained_mlp_pair: tuple[Path, Path]) -> None:
    a, b = trained_mlp_pair
    code, stdout, err = run("barrier", a, b, "--alphas", "3", "--method", "none", "--json")
    assert code == 0, err
    assert err == ""
    report = json.loads(stdout)
    assert list(report["evaluation"]["paths"]) == ["naive"]
    assert "match" not in report


def test_barrier_gate(trained_mlp_pair: tuple[Path, Path]) -> None:
    a, b = trained_mlp_pair
    # a barrier is never negative: a gate below zero fails on every pair
    code, _, err = run("barrier", a, b, "--alphas", "3", "--max-barrier", "-1", "--budget", "1")
    assert code == 1
    assert "gate failed: test loss barrier" in err
    # A against itself: a flat path, whose barrier is zero to float tolerance
    assert run("barrier", a, a, "--alphas", "3", "--max-barrier", "0.001", "--method", "none")[0] == 0


def test_merge_with_data_reports_barrier(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    code, stdout, _ = run(
        "merge", a, b, "-o", tmp_path / "m.safetensors", "--data", "mnist1d", "--alphas", "3", "--json"
    )
    assert code == 0
    report = json.loads(stdout)
    assert set(report["evaluation"]["paths"]) == {"naive", "aligned"}
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["rebasin.arch"] == "mlp"  # carried over: later commands rebuild the model
    assert meta["rebasin.data"] == "mnist1d"


def test_merge_bn_reset_recomputes_statistics(trained_bn_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_bn_pair
    plain, reset = tmp_path / "plain.safetensors", tmp_path / "reset.safetensors"
    assert run("merge", a, b, "-o", plain, "--method", "weight")[0] == 0
    code, _, err = run("merge", a, b, "-o", reset, "--bn", "reset", "--alphas", "3", "--method", "weight")
    assert code == 0, err
    p, r = load_file(plain), load_file(reset)
    assert torch.equal(p["net.0.weight"], r["net.0.weight"])
    assert not torch.allclose(p["net.1.running_var"], r["net.1.running_var"])
    with safe_open(str(reset), "pt") as f:
        assert f.metadata()["rebasin.bn"] == "reset"
    # the reset statistics are the training data's (one pass of whole batches): the first
    # BatchNorm's running mean is the mean of its input over the training set
    from rebasin.data import load_data

    x = load_data("mnist1d").x_train
    pre = torch.nn.functional.linear(x, r["net.0.weight"], r["net.0.bias"]).double()
    assert torch.allclose(r["net.1.running_mean"].double(), pre.mean(0), rtol=1e-4, atol=1e-4)


def test_train_is_deterministic_and_records_metadata(tmp_path: Path) -> None:
    outs = []
    for i in range(2):
        out = tmp_path / f"t{i}.safetensors"
        code, _, err = run(
            "train",
            "--model",
            "mlp",
            "--data",
            "synthetic",
            "--epochs",
            "3",
            "--lr",
            "0.01",
            "--model-args",
            '{"hidden": 16, "depth": 1}',
            "--seed",
            "3",
            "-o",
            out,
        )
        assert code == 0, err
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    with safe_open(str(tmp_path / "t0.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["rebasin.arch"] == "mlp"
    assert json.loads(meta["rebasin.arch_args"]) == {
        "depth": 1,
        "hidden": 16,
        "in_features": 32,
        "num_classes": 4,
    }
    assert meta["rebasin.data"] == "synthetic"
    # the recorded metrics are the checkpoint's own (what training reaches is a figure)
    from rebasin.data import load_data
    from rebasin.evaluate.metrics import evaluate
    from rebasin.models import build_model

    model = build_model("mlp", **json.loads(meta["rebasin.arch_args"]))
    model.load_state_dict(load_file(tmp_path / "t0.safetensors"))
    got = evaluate(model, *load_data("synthetic", 3).split("test"))
    assert float(meta["rebasin.test_acc"]) == pytest.approx(got.acc, abs=1e-6)
    assert float(meta["rebasin.test_loss"]) == pytest.approx(got.loss, abs=1e-5)


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code, _, err = run("demo", "-o", out, "--epochs", "2", "--alphas", "5", "--budget", "1")
    assert code == 0, err
    for name in (
        "a.safetensors",
        "b.safetensors",
        "merged.safetensors",
        "barrier.png",
        "barrier.svg",
        "report.json",
    ):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "demo"
    assert "aligned test loss barrier is" in err
    expect_error(["demo", "-o", out], f"{out}: folder exists and is not empty", "pass --force to reuse it")


# ------------------------------------------------------------------------------ batch


def _plan(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return p


def test_batch_runs_items_and_gates(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    plan = _plan(
        tmp_path,
        f"""
format_version: 1
defaults: {{alphas: 3, method: weight}}
items:
  - {{name: merge-it, a: {a}, b: {b}, output: merged.safetensors, data: mnist1d}}
  - {{name: strict, a: {a}, b: {b}, data: mnist1d, max_barrier: -1}}  # barriers are never negative
  - {{name: naive, a: {a}, b: {b}, data: mnist1d, method: none}}
""",
    )
    code, stdout, _ = run("batch", plan, "--json")
    assert code == 1
    summary = json.loads(stdout)
    status = {i["name"]: i["status"] for i in summary["items"]}
    assert status == {"merge-it": "ok", "strict": "gate_failed", "naive": "ok"}
    assert (tmp_path / "merged.safetensors").exists()
    assert summary["passed"] == 2 and summary["failed"] == 1
    # JSON lines, one per item
    (tmp_path / "merged.safetensors").unlink()
    code, stdout, _ = run("batch", plan, "--jsonl")
    assert [json.loads(line)["name"] for line in stdout.splitlines()] == ["merge-it", "strict", "naive"]


def test_batch_continues_past_a_failing_item(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    plan = _plan(
        tmp_path,
        f"""
format_version: 1
items:
  - {{name: bad-data, a: {a}, b: {b}, data: nosuchdata, alphas: 3}}
  - {{name: good, a: {a}, b: {b}, data: mnist1d, alphas: 3}}
""",
    )
    code, stdout, _ = run("batch", plan, "--json")
    assert code == 1
    items = json.loads(stdout)["items"]
    assert items[0]["status"] == "error" and items[0]["error"].startswith("unknown data 'nosuchdata'")
    assert items[1]["status"] == "ok"


def test_invalid_plan_lists_every_problem(tmp_path: Path) -> None:
    plan = _plan(
        tmp_path,
        """
format_version: 1
colour: blue
items:
  - {name: x, a: missing_a.safetensors, b: missing_b.safetensors, output: o.safetensors, speed: 3}
  - {name: y, b: missing_b.safetensors, alphas: many}
""",
    )
    expect_error(
        ["batch", plan],
        f"{plan}: unknown key 'colour' at top level; item 'x': unknown key 'speed'; "
        f"item 'x': a file '{tmp_path / 'missing_a.safetensors'}' does not exist; "
        f"item 'x': b file '{tmp_path / 'missing_b.safetensors'}' does not exist; "
        "item 'y': 'alphas' must be int, got 'many'; item 'y': missing 'a'; "
        f"item 'y': b file '{tmp_path / 'missing_b.safetensors'}' does not exist; "
        "item 'y': nothing to do (give 'output' to merge, 'data' to measure a barrier)",
    )
    no_leftovers(tmp_path, "o.safetensors")


# ------------------------------------------------------------------------------ bad data


def test_data_that_does_not_fit_the_model(trained_mlp_pair: tuple[Path, Path]) -> None:
    a, b = trained_mlp_pair
    code, _, err = run("barrier", a, b, "--data", "digits")
    assert code == 2
    assert err.startswith("error: digits: inputs of shape (1, 8, 8) do not fit model 'mlp' (")


def test_labels_out_of_range(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    x = np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32)
    y = np.arange(50) % 13
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    expect_error(["barrier", a, b, "--data", p], f"{p}: labels go up to 12 but model 'mlp' has 10 outputs")
    neg = tmp_path / "neg.npz"
    np.savez(neg, x=x, y=y - 1, x_test=x[:5], y_test=y[:5])
    expect_error(["barrier", a, b, "--data", neg], f"{neg}: train label -1 is out of range [0, 12)")


def test_empty_data(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    p = tmp_path / "empty.npz"
    np.savez(p, x=np.zeros((0, 40), np.float32), y=np.zeros((0,), np.int64))
    expect_error(["barrier", a, b, "--data", p], f"{p}: data is empty (no training examples)")


def test_unknown_data_suggests(trained_mlp_pair: tuple[Path, Path]) -> None:
    a, b = trained_mlp_pair
    expect_error(
        ["barrier", a, b, "--data", "mnist"],
        "unknown data 'mnist' (built-in: mnist1d, digits, synthetic; or a .safetensors/.npz file, or MODULE:FUNCTION)",
        "did you mean 'mnist1d'?",
    )


def test_model_is_needed_for_a_barrier(mlp_pair: tuple[Path, Path]) -> None:
    a, b = mlp_pair
    expect_error(
        ["barrier", a, b, "--data", "mnist1d"],
        f"{a}: no model definition: the checkpoint records no architecture",
        "pass --model NAME (built-in: mlp, resnet20, resnet, transformer, vgg) or --model MODULE:FACTORY",
    )


def test_model_that_does_not_fit_the_checkpoint(trained_mlp_pair: tuple[Path, Path]) -> None:
    a, b = trained_mlp_pair
    expect_error(
        ["barrier", a, b, "--model", "mlp", "--model-args", '{"in_features": 40, "hidden": 64, "depth": 2}'],
        f"{a}: model 'mlp' does not fit the checkpoint: 'net.0.weight' has shape (128, 40), the model expects (64, 40); "
        "'net.0.bias' has shape (128,), the model expects (64,); 'net.2.weight' has shape (128, 128), the model expects (64, 64)",
        "pass the --model (and --model-args) the checkpoint was trained with",
    )


@pytest.mark.parametrize("bad", ['{"hidden": ', "[1, 2]"])
def test_bad_model_args(trained_mlp_pair: tuple[Path, Path], bad: str) -> None:
    a, b = trained_mlp_pair
    code, _, err = run("barrier", a, b, "--model", "mlp", "--model-args", bad)
    assert code == 2
    assert err.startswith("error: --model-args ")
