"""Weight matching's first sweep: units by reach against the paper's random order, on small
trained pairs (where the default is the random order: reach-first only pays where the products
dominate, from ``REACH_FIRST_WORK`` multiply-adds a sweep, and this benchmark is why).

Trains its pairs first (plain recipes of the built-in trainer, other widths and epochs than the
tests): an MLP 4 x 256 and a BatchNorm MLP 3 x 256 on MNIST-1D, a ResNet-20 (width 1) and a VGG
(16, M, 32, M; BatchNorm) on digits. For each pair and each matching seed, runs weight matching
with the first sweep by reach and with every sweep in the seeded random order (the reach of
every unit set equal, so the seeded order decides), and prints the objective <A, pi(B)> reached
(mean, min, max over the seeds), the sweeps and the seconds. A planted pair (B = A permuted)
checks that both orders recover the permutation.

    python benchmarks/bench_first_sweep.py [--seeds 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from rebasin.checkpoint import load_checkpoint
from rebasin.commands.train import train_checkpoint
from rebasin.matching import match
from rebasin.matching.costs import CostModel
from rebasin.matching.result import MatchResult
from rebasin.permutation import permute, random_permutation
from rebasin.spec import infer_spec

PAIRS: dict[str, tuple[str, dict[str, Any], str, int, float]] = {
    "MLP 4x256, MNIST-1D": ("mlp", {"in_features": 40, "hidden": 256, "depth": 4}, "mnist1d", 10, 1e-3),
    "MLP-BN 3x256, MNIST-1D": (
        "mlp",
        {"in_features": 40, "hidden": 256, "depth": 3, "norm": "bn"},
        "mnist1d",
        10,
        1e-3,
    ),
    "ResNet-20 (w=1), digits": ("resnet20", {"width": 1, "in_channels": 1}, "digits", 8, 3e-3),
    "VGG 16-M-32-M, digits": ("vgg", {}, "digits", 10, 3e-3),
}


def trained(out: Path, label: str, seed: int) -> dict[str, torch.Tensor]:
    arch, args, data, epochs, lr = PAIRS[label]
    slug = "".join(c if c.isalnum() else "-" for c in label.split(",")[0].lower())
    p = out / f"first-sweep-{slug}-{seed}.safetensors"
    if not p.exists():
        train_checkpoint(arch, args, data, p, seed=seed, epochs=epochs, lr=lr, force=True)
    return dict(load_checkpoint(p).state)


def runs(a: dict, b: dict, seeds: int, order: str) -> list[tuple[MatchResult, float]]:
    """Weight matching of B to A for each seed, with the given first-sweep order, and seconds."""
    spec = infer_spec(a)
    out = []
    with contextlib.ExitStack() as stack:
        if order == "random":  # every unit reaches as far: the seeded random order decides
            stack.enter_context(mock.patch.object(CostModel, "reach", lambda self, u: 0.0))
        else:  # by reach at any size (by default only from REACH_FIRST_WORK multiply-adds)
            stack.enter_context(mock.patch("rebasin.matching.weight.REACH_FIRST_WORK", 0.0))
        for s in range(seeds):
            t = time.perf_counter()
            r = match(a, b, spec, seed=s)
            out.append((r, time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("rebasin-bench"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    cols = f"{'objective mean':>15} {'min':>10} {'max':>10} {'sweeps':>7} {'s':>7}"
    print(f"{'pair':<26} {'first sweep':<12} {cols}")
    for label in PAIRS:
        a, b = trained(args.out, label, 0), trained(args.out, label, 1)
        spec = infer_spec(a)
        planted = dict(permute(a, spec, random_permutation(spec, 11)))
        for order in ("reach", "random"):
            rs = runs(a, b, args.seeds, order)
            obj = [r.objective for r, _ in rs]
            sweeps = statistics.mean(r.restarts[0].sweeps for r, _ in rs)
            seconds = statistics.mean(t for _, t in rs)
            found = runs(a, planted, 1, order)[0][0]
            back = permute(planted, spec, found.perm)
            ok = all(torch.equal(back[k], a[k]) for k in spec.params)
            print(
                f"{label:<26} {order:<12} {statistics.mean(obj):>15.3f} {min(obj):>10.3f} {max(obj):>10.3f} "
                f"{sweeps:>7.1f} {seconds:>7.2f}  planted: {'recovered' if ok else 'NOT recovered'} "
                f"in {found.restarts[0].sweeps} sweeps",
                flush=True,
            )


if __name__ == "__main__":
    main()
