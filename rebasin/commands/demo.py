"""The whole job on built-in data, zero configuration: train two MLPs on MNIST-1D with different
seeds, align and merge them, measure both interpolation paths, write checkpoints, report and plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rebasin.matching.result import Progress

DEMO_MODEL = {"in_features": 40, "hidden": 512, "depth": 2, "num_classes": 10}


def train_checkpoint(
    arch: str,
    arch_args: dict[str, Any],
    data_name: str,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a built-in (or importable) model and save it with its architecture, data and
    final metrics in the metadata; return a small report."""
    import torch

    from rebasin.checkpoint import check_output_path, save_checkpoint
    from rebasin.data import list_data, load_data
    from rebasin.evaluate.metrics import check_data_fits
    from rebasin.models.resolve import DATA_KEY, ModelRef
    from rebasin.models.train import TrainConfig, train
    from rebasin.report.document import new_report

    check_output_path(out, [], force)
    data = load_data(data_name, seed)
    ref = ModelRef(arch, arch_args)
    factory = ref.factory()
    torch.manual_seed(seed)
    model = factory()
    check_data_fits(model, data, arch)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    metrics = train(model, data, cfg, progress)
    meta = {
        **ref.metadata(),
        **({DATA_KEY: data_name} if data_name in list_data() else {}),
        "rebasin.command": "train",
        "rebasin.seed": str(seed),
        "rebasin.train": f"epochs={epochs} lr={lr} batch_size={batch_size} weight_decay={weight_decay}",
    }
    for split, m in metrics.items():
        meta[f"rebasin.{split}_loss"] = f"{m.loss:.6f}"
        meta[f"rebasin.{split}_acc"] = f"{m.acc:.6f}"
    from rebasin._version import __version__

    meta["rebasin.version"] = __version__
    files = save_checkpoint(model.state_dict(), out, meta)
    rep = new_report("train")
    rep["model"] = {"name": arch, "args": arch_args}
    rep["data"] = data.describe()
    rep["seed"] = seed
    rep["metrics"] = {s: {"loss": m.loss, "acc": m.acc} for s, m in metrics.items()}
    rep["output"] = {"files": [str(f) for f in files]}
    return rep


def check_demo_folder(out_dir: str | os.PathLike[str], force: bool) -> None:
    """The demo writes into a new or empty folder unless ``force``."""
    from rebasin.core.errors import CheckpointError

    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise CheckpointError("exists and is not a folder", source=str(d))
    if d.exists() and any(d.iterdir()) and not force:
        raise CheckpointError("folder exists and is not empty", "pass --force to reuse it", source=str(d))


def run_demo(
    out_dir: str | os.PathLike[str] = "rebasin-demo",
    *,
    epochs: int = 20,
    alphas: int = 25,
    budget: float = 60.0,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train A (seed 0) and B (seed 1), merge (method auto within ``budget`` seconds), evaluate;
    write everything into ``out_dir``."""
    from rebasin.checkpoint.guard import checkpoint_output, file_output, guard_outputs, plot_output
    from rebasin.commands import merge_checkpoints
    from rebasin.matching.methods import AutoMatch
    from rebasin.options import EvalOptions, Options, OutputOptions
    from rebasin.report.document import write_report
    from rebasin.report.plot import plot_curves

    d = Path(out_dir)
    check_demo_folder(d, force)
    d.mkdir(parents=True, exist_ok=True)
    paths = {k: d / f"{k}.safetensors" for k in ("a", "b", "merged")}
    outputs = [checkpoint_output(p, k) for k, p in paths.items()]
    guard_outputs(
        [*outputs, file_output(d / "report.json", "report"), plot_output(d / "barrier.png")], [], force
    )
    for seed, key in ((0, "a"), (1, "b")):
        train_checkpoint(
            "mlp", DEMO_MODEL, "mnist1d", paths[key], seed=seed, epochs=epochs, force=True, progress=progress
        )
    report = merge_checkpoints(
        paths["a"],
        paths["b"],
        paths["merged"],
        Options(
            match=AutoMatch(budget=budget),
            output=OutputOptions(force=True),
            evaluate=EvalOptions(alphas=alphas),
        ),
        progress,
    )
    report["command"] = "demo"
    plots = plot_curves(report["evaluation"], d / "barrier.png")
    report["output"]["files"]["plot"] = [str(p) for p in plots]
    report["output"]["files"]["checkpoints"] = [str(paths["a"]), str(paths["b"])]
    report["output"]["files"]["report"] = [str(d / "report.json")]
    write_report(report, d / "report.json")
    return report
