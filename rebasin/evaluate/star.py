"""Star models (Sonthalia, Rubinstein, Abbasnejad, Oh, "Do Deep Neural Network Solutions Form a
Star Domain?", ICLR 2025): one model linearly connected, modulo permutations, to many solutions.

Starlight trains it. At each step: pick a source model at random; take its alignment to the
current star model (weight matching, refreshed every ``refresh`` steps); draw ``alpha`` uniformly
in [0, 1]; descend on the task loss at ``(1 - alpha) star + alpha pi(source)`` with respect to the
star model's parameters only. BatchNorm layers normalize with the batch's statistics, as a
barrier measured after a BatchNorm reset sees them.

The state (star parameters, optimizer moments, step, random generator) is saved to a state file
at every refresh (the steps where the sources are re-aligned) and at the end, so an interrupted
run resumes from its last refresh bit for bit as if it had not stopped.
Memory: the star model, its gradient and two Adam moments (float32), and every source aligned
to it (float32): (4 + number of sources) times the model's float32 size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rebasin.checkpoint.atomic import write_with
from rebasin.core.types import Permutation, Progress
from rebasin.matching.adam import Adam
from rebasin.permutation import permute
from rebasin.spec.core import PermutationSpec


@dataclass(frozen=True)
class StarConfig:
    steps: int
    refresh: int
    lr: float
    seed: int


Align = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], Permutation]
"""align(star, source) -> the permutation of ``source`` that aligns it with ``star``."""


def train_star(
    init: Mapping[str, torch.Tensor],
    sources: Sequence[Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    task_loss: Callable[[dict[str, torch.Tensor], int], torch.Tensor],
    align: Align,
    config: StarConfig,
    state_file: Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The star model trained from ``init`` for ``config.steps`` steps, and the loss of every
    step. Deterministic given ``config.seed``; with ``resume``, continues from ``state_file``."""
    params = {k: v.detach().float().clone() for k, v in init.items() if v.is_floating_point()}
    fixed = {k: v for k, v in init.items() if not v.is_floating_point()}
    rng = np.random.default_rng(config.seed)
    opt = Adam([p.requires_grad_(True) for p in params.values()], lr=config.lr)
    losses: list[float] = []
    start = 0
    if resume and state_file is not None and state_file.exists():
        saved = torch.load(state_file, weights_only=True)
        with torch.no_grad():
            for k, v in saved["params"].items():
                params[k].copy_(v)
        opt.load_state(saved["adam"])
        rng.bit_generator.state = _rng_state(saved["rng"])
        start, losses = int(saved["step"]), list(saved["losses"])
    aligned: list[dict[str, torch.Tensor]] = []
    for step in range(start, config.steps):
        if not aligned or step % config.refresh == 0:
            star = {**fixed, **{k: v.detach() for k, v in params.items()}}
            aligned = [
                {
                    k: v.float()
                    for k, v in permute(src, spec, align(star, src)).items()
                    if v.is_floating_point()
                }
                for src in sources
            ]
        k = int(rng.integers(len(sources)))
        alpha = float(rng.random())
        point = {p: (1 - alpha) * v + alpha * aligned[k][p] for p, v in params.items()}
        loss = task_loss(point, step)
        opt.zero_grad()
        if bool(torch.isfinite(loss.detach())):
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
        if progress:
            progress("star training", step + 1, config.steps)
        done = step + 1
        if state_file is not None and (done % config.refresh == 0 or done == config.steps):
            _save(state_file, params, opt, rng, done, losses)
    out = {**fixed, **{k: v.detach().clone() for k, v in params.items()}}
    return {k: out[k].to(init[k].dtype) for k in init}, losses


def _save(
    path: Path,
    params: dict[str, torch.Tensor],
    opt: Adam,
    rng: np.random.Generator,
    step: int,
    losses: list[float],
) -> None:
    state = {
        "params": {k: v.detach().clone() for k, v in params.items()},
        "adam": opt.state_dict(),
        "rng": _rng_tensor(dict(rng.bit_generator.state)),
        "step": step,
        "losses": losses,
    }
    write_with(path, lambda t: torch.save(state, t))


def _rng_tensor(state: dict[str, Any]) -> dict[str, Any]:
    """numpy's PCG64 state as plain numbers (``torch.load(weights_only=True)`` takes them)."""
    s = state["state"]
    return {
        "state": str(s["state"]),
        "inc": str(s["inc"]),
        "has_uint32": state["has_uint32"],
        "uinteger": state["uinteger"],
    }


def _rng_state(saved: dict[str, Any]) -> dict[str, Any]:
    return {
        "bit_generator": "PCG64",
        "state": {"state": int(saved["state"]), "inc": int(saved["inc"])},
        "has_uint32": int(saved["has_uint32"]),
        "uinteger": int(saved["uinteger"]),
    }


def star_points(
    star: Mapping[str, torch.Tensor],
    aligned: Sequence[Mapping[str, torch.Tensor]],
    k: int,
    seed: int,
) -> list[dict[str, torch.Tensor]]:
    """``k`` random points of the star domain: ``(1 - alpha) star + alpha pi(source)`` for a
    source and an alpha drawn uniformly (seeded)."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for _ in range(k):
        src = aligned[int(rng.integers(len(aligned)))]
        alpha = float(rng.random())
        out.append(
            {
                p: ((1 - alpha) * v.float() + alpha * src[p].float()).to(v.dtype)
                if v.is_floating_point()
                else v
                for p, v in star.items()
            }
        )
    return out


def calibration(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """Accuracy and expected calibration error (equal-width confidence bins, Guo et al. 2017) of
    averaged class probabilities."""
    conf, pred = probs.max(dim=1)
    correct = (pred == y).float()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1)
    for lo, hi in itertools.pairwise(edges.tolist()):
        inside = (conf > lo) & (conf <= hi)
        if bool(inside.any()):
            ece += float(inside.float().mean()) * abs(
                float(conf[inside].mean()) - float(correct[inside].mean())
            )
    return {
        "acc": float(correct.mean()),
        "ece": ece,
        "nll": float(-torch.log(probs[torch.arange(len(y)), y].clamp_min(1e-12)).mean()),
    }
