"""Train a model on a data set (seeded, small, CPU-friendly) so anyone can make pairs to merge."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rebasin.core.types import Progress
from rebasin.data.core import Dataset, batches
from rebasin.evaluate.metrics import Metrics, evaluate


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer settings: AdamW with a one-cycle learning-rate schedule."""

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    seed: int = 0


def train(
    model: nn.Module, data: Dataset, cfg: TrainConfig, progress: Progress | None = None
) -> dict[str, Metrics]:
    """Train ``model`` in place; return final train/test metrics. Same seed, same weights."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(data.y_train) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    device = next(model.parameters()).device
    for epoch in range(cfg.epochs):
        model.train()
        for xb, yb in batches(
            data.x_train, data.y_train, cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch
        ):
            loss = nn.functional.cross_entropy(model(xb.to(device)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress(f"training (seed {cfg.seed})", epoch + 1, cfg.epochs)
    model.eval()
    return {s: evaluate(model, *data.split(s)) for s in ("train", "test")}
