"""Why a barrier stays, layer by layer: for MLPs trained from different seeds, each weight
tensor's top-k singular-direction agreement after weight matching beside the barrier its layer
holds alone, and how the two relate across layers and pairs.

    python examples/diagnose_layers.py [--quick] [--out DIR] [--plot PATH.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scipy.stats import spearmanr

from rebasin import build_options
from rebasin.commands.diagnose import diagnose_checkpoints
from rebasin.commands.train import train_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    ap.add_argument("--resnet", action="store_true", help="BatchNorm ResNet-20s on the digits images instead")
    ap.add_argument("--out", type=Path, default=Path("rebasin-examples/diagnose"))
    ap.add_argument("--plot", type=Path, default=None, help="write the first pair's figure here")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds, epochs, alphas = (range(2), 1, 3) if args.quick else (range(5), 20, 11)
    name, arch, data = "mlp", {"in_features": 40, "hidden": 256, "depth": 3, "num_classes": 10}, "mnist1d"
    if args.resnet:
        name, arch, data = "resnet20", {"width": 2, "in_channels": 1, "num_classes": 10}, "digits"
    paths = []
    for seed in seeds:
        p = args.out / f"{name}_s{seed}.safetensors"
        train_checkpoint(
            name, arch, data, p, seed=seed, epochs=epochs, lr=3e-3 if args.resnet else 1e-3, force=True
        )
        paths.append(p)
    points = []
    print(f"{'pair':<8} {'layer':<7} {'before':>7} {'after':>7} {'layer barrier':>14} {'whole path':>11}")
    for j in range(1, len(paths)):
        values = {"data": data, "alphas": alphas, "method": "weight"}
        if args.plot is not None and j == 1:
            values |= {"plot": str(args.plot), "force": True}
        d = diagnose_checkpoints(paths[0], paths[j], build_options(values, "diagnose"))["diagnosis"]
        for layer in d["layers"]:
            points.append((layer["after"], layer["barrier"]))
            print(
                f"M1-M{j + 1:<4} {layer['layer']:<7} {layer['before']:>7.3f} {layer['after']:>7.3f} "
                f"{layer['barrier']:>14.3f} {d['barrier']['whole_path']:>11.3f}"
            )
    if len(points) > 2:
        rho, p = spearmanr([a for a, _ in points], [b for _, b in points])
        print(f"\nSpearman correlation, agreement after alignment vs layer barrier: {rho:.2f} (p = {p:.2g})")


if __name__ == "__main__":
    main()
