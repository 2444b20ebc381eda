"""The ``train`` command: train a built-in (or importable) model on a data set, seeded, and save
it with what later commands need to rebuild it (architecture, data) in its metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rebasin._version import __version__
from rebasin.checkpoint import check_output_path, save_checkpoint
from rebasin.core.errors import ConfigError
from rebasin.core.types import PathLike, Progress
from rebasin.data import list_data, load_data
from rebasin.evaluate.metrics import check_data_fits
from rebasin.evaluate.training import TrainConfig, train
from rebasin.models.resolve import DATA_KEY, ModelRef
from rebasin.options import Options
from rebasin.report.document import new_report


def train_from_options(opts: Options, progress: Progress | None = None) -> dict[str, Any]:
    """``rebasin train``: the model, data and optimizer settings of ``opts``; a built-in MLP
    takes its input and output sizes from the data unless ``--model-args`` gives them."""

    if opts.output.output is None:
        raise ConfigError("train needs an output path (-o)")
    arch, args, data = (
        opts.model.model or "mlp",
        dict(opts.model.model_args or {}),
        opts.evaluate.data or "mnist1d",
    )
    if arch == "mlp" and "in_features" not in args:
        d = load_data(data, opts.run.seed)
        args = {"in_features": int(d.x_train[0].numel()), "num_classes": d.num_classes, **args}
    t = opts.train
    return train_checkpoint(
        arch,
        args,
        data,
        opts.output.output,
        seed=opts.run.seed,
        epochs=t.epochs,
        lr=t.lr,
        batch_size=t.batch_size,
        weight_decay=t.weight_decay,
        force=opts.output.force,
        progress=progress,
    )


def train_checkpoint(
    arch: str,
    arch_args: dict[str, Any],
    data_name: str,
    out: PathLike,
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

    check_output_path(out, [data_name] if Path(data_name).exists() else [], force)
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

    meta["rebasin.version"] = __version__
    files = save_checkpoint(model.state_dict(), out, meta)
    rep = new_report("train")
    rep["model"] = {"name": arch, "args": arch_args}
    rep["data"] = data.describe()
    rep["seed"] = seed
    rep["train"] = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay}
    rep["metrics"] = {s: {"loss": m.loss, "acc": m.acc} for s, m in metrics.items()}
    rep["output"] = {"files": [str(f) for f in files]}
    return rep
