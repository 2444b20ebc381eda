"""Compare matching methods on trained pairs: search time, loss barrier (both definitions) and
midpoint accuracy on test data. Trains its pairs first (the demo MLP pair on MNIST-1D and a
ResNet-20 pair on digits). Usage: python benchmarks/bench_methods.py [--quick] [--out DIR]"""

from __future__ import annotations

import argparse
from pathlib import Path

from rebasin import barrier_checkpoints, build_options
from rebasin.commands.demo import DEMO_MODEL, train_checkpoint

METHODS = [
    ("none (naive)", None, {}),
    ("auto (default)", "auto", {}),
    ("weight", "weight", {}),
    ("weight, 5 restarts", "weight", {"restarts": 5}),
    ("activation", "activation", {}),
    ("sinkhorn l2", "sinkhorn", {"cost": "l2"}),
    ("sinkhorn mid", "sinkhorn", {"cost": "mid"}),
    ("sinkhorn rnd", "sinkhorn", {"cost": "rnd"}),
    ("ste", "ste", {}),
    ("ste reinmax", "ste", {"estimator": "reinmax"}),
]


def pairs(out: Path, quick: bool) -> dict[str, tuple[Path, Path]]:
    out.mkdir(parents=True, exist_ok=True)
    specs = {
        "MLP 2x512, MNIST-1D": ("mlp", DEMO_MODEL, "mnist1d", 20, 1e-3),
        "MLP 3x512, MNIST-1D": ("mlp", {**DEMO_MODEL, "depth": 3}, "mnist1d", 20, 1e-3),
        "ResNet-20 (w=1), digits": ("resnet20", {"width": 1, "in_channels": 1}, "digits", 15, 3e-3),
    }
    result = {}
    for label, (arch, args, data, epochs, lr) in specs.items():
        if quick:
            epochs = 2
        paths = []
        for seed in (0, 1):
            p = out / f"{arch}{args.get('depth', '')}_{seed}.safetensors"
            if not p.exists():
                train_checkpoint(arch, args, data, p, seed=seed, epochs=epochs, lr=lr, force=True)
            paths.append(p)
        result[label] = (paths[0], paths[1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("rebasin-bench"))
    ap.add_argument("--pair", default="", help="only pairs whose label contains this text")
    ap.add_argument("--only", default="", help="only methods whose label contains this text (naive always)")
    args = ap.parse_args()
    alphas = 5 if args.quick else 11
    for label, (a, b) in pairs(args.out, args.quick).items():
        if args.pair not in label:
            continue
        print(f"\n{label} (test split, {alphas} alphas)")
        print(f"{'method':<20} {'search s':>9} {'loss barrier':>13} {'(mean def.)':>12} {'midpoint acc':>13}")
        for name, method, extra in METHODS:
            if method is not None and args.only not in name:
                continue
            if args.quick and method in ("sinkhorn", "ste"):
                extra = {**extra, "steps": 20}
            values = {"method": method or "none", "alphas": alphas, **extra}
            rep = barrier_checkpoints(a, b, build_options(values, "barrier"))
            path = "aligned" if method else "naive"
            search = rep["match"]["seconds"] if method else 0.0
            curve = rep["evaluation"]["paths"][path]
            mid = curve["acc"]["test"][len(curve["alphas"]) // 2]
            bar = curve["barriers"]["test"]["loss"]
            train = curve["barriers"]["train"]["loss"]["linear"]
            note = f"  train {train:.3f}"
            if method == "auto":
                note += f"  chose {rep['match']['options']['chosen']}"
            if rep["evaluation"].get("aligned_worse_than_naive"):
                note += f"  WORSE THAN NAIVE on {rep['evaluation']['aligned_worse_than_naive']}"
            print(
                f"{name:<20} {search:>9.2f} {bar['linear']:>13.3f} {bar['mean']:>12.3f} {100 * mid:>12.1f}%"
                + note
            )


if __name__ == "__main__":
    main()
