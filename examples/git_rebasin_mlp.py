"""The Git Re-Basin MLP result at small scale: two MLPs trained from different seeds sit in
different basins (a high loss barrier on the straight path between them); after weight matching
the barrier nearly vanishes.

    python examples/git_rebasin_mlp.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rebasin import Options, WeightMatching, barrier_checkpoints
from rebasin.commands.train import train_checkpoint
from rebasin.options import EvalOptions
from rebasin.report.plot import plot_curves


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    ap.add_argument("--out", type=Path, default=Path("rebasin-examples/mlp"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hidden, epochs, alphas = (64, 2, 5) if args.quick else (512, 20, 25)
    arch = {"in_features": 40, "hidden": hidden, "depth": 3, "num_classes": 10}
    paths = []
    for seed in (0, 1):
        p = args.out / f"mlp{seed}.safetensors"
        train_checkpoint("mlp", arch, "mnist1d", p, seed=seed, epochs=epochs, force=True)
        paths.append(p)
    report = barrier_checkpoints(
        *paths, Options(match=WeightMatching(restarts=5), evaluate=EvalOptions(alphas=alphas))
    )
    plot_curves(report["evaluation"], args.out / "mlp_barrier.png", f"MLP 3 x {hidden} on MNIST-1D")
    print(f"{'path':<8} {'split':<6} {'loss barrier':>12} {'error barrier':>13} {'midpoint acc':>12}")
    for name, curve in report["evaluation"]["paths"].items():
        mid = len(curve["alphas"]) // 2
        for split in ("train", "test"):
            b = curve["barriers"][split]
            print(
                f"{name:<8} {split:<6} {b['loss']['linear']:>12.3f} {100 * b['error']['linear']:>12.1f}% "
                f"{100 * curve['acc'][split][mid]:>11.1f}%"
            )
    print(f"plot: {args.out / 'mlp_barrier.png'}")


if __name__ == "__main__":
    main()
