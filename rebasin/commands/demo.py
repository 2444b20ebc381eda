"""The whole job on built-in data, zero configuration: train two MLPs on MNIST-1D with different
seeds, align and merge them, measure both interpolation paths, write checkpoints, report and plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rebasin.checkpoint.guard import checkpoint_output, file_output, guard_outputs, plot_output
from rebasin.commands import merge_checkpoints
from rebasin.commands.train import train_checkpoint
from rebasin.core.errors import CheckpointError
from rebasin.core.types import Progress
from rebasin.matching.methods import AutoMatch
from rebasin.options import EvalOptions, Options, OutputOptions
from rebasin.report.document import write_report
from rebasin.report.plot import plot_curves

DEMO_MODEL = {"in_features": 40, "hidden": 512, "depth": 2, "num_classes": 10}
DEMO_DATA = "mnist1d"


def check_demo_folder(out_dir: str | os.PathLike[str], force: bool) -> None:
    """The demo writes into a new or empty folder unless ``force``."""

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
            "mlp", DEMO_MODEL, DEMO_DATA, paths[key], seed=seed, epochs=epochs, force=True, progress=progress
        )
    report = merge_checkpoints(
        paths["a"],
        paths["b"],
        paths["merged"],
        Options(
            method=AutoMatch.name,
            match=AutoMatch(budget=budget),
            output=OutputOptions(force=True),
            evaluate=EvalOptions(data=DEMO_DATA, alphas=alphas),
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
