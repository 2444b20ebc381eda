"""The pairwise barrier map of five MLPs trained from different seeds: naive and aligned, every
pair on its own and in the first model's coordinates, with the basins and a heatmap.

    python examples/barrier_map.py [--quick] [--out DIR] [--plot PATH.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rebasin import barrier_map, build_options
from rebasin.commands.train import train_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    ap.add_argument("--resnet", action="store_true", help="BatchNorm ResNet-20s on the digits images instead")
    ap.add_argument("--out", type=Path, default=Path("rebasin-examples/map"))
    ap.add_argument("--plot", type=Path, default=None, help="write the heatmap here")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds, epochs, alphas = (range(3), 1, 3) if args.quick else (range(5), 20, 11)
    name, arch, data = "mlp", {"in_features": 40, "hidden": 256, "depth": 2, "num_classes": 10}, "mnist1d"
    if args.resnet:
        name, arch, data = "resnet20", {"width": 2, "in_channels": 1, "num_classes": 10}, "digits"
    paths = []
    for seed in seeds:
        p = args.out / f"{name}_s{seed}.safetensors"
        train_checkpoint(
            name, arch, data, p, seed=seed, epochs=epochs, lr=3e-3 if args.resnet else 1e-3, force=True
        )
        paths.append(p)
    for reference in (None, str(paths[0])):
        values = {"data": data, "alphas": alphas, "method": "weight", "reference": reference}
        if args.plot is not None and reference is None:
            values |= {"plot": str(args.plot), "force": True}
        rep = barrier_map(paths, build_options({k: v for k, v in values.items() if v is not None}, "barrier"))
        m = rep["map"]
        where = "each pair aligned on its own" if reference is None else "all aligned to M1"
        print(f"\ntest loss barrier, {where} (naive / aligned)")
        print("      " + "".join(f"{f'M{j + 1}':>15}" for j in range(len(paths))))
        for i in range(len(paths)):
            cells = "".join(
                f"{'-':>15}" if i == j else f"{m['naive'][i][j]:>7.3f} /{m['aligned'][i][j]:>6.3f}"
                for j in range(len(paths))
            )
            print(f"M{i + 1:<5}{cells}")
        off = [m["aligned"][i][j] for i in range(len(paths)) for j in range(i + 1, len(paths))]
        naive = [m["naive"][i][j] for i in range(len(paths)) for j in range(i + 1, len(paths))]
        print(
            f"mean naive {sum(naive) / len(naive):.3f}, mean aligned {sum(off) / len(off):.3f}, "
            f"basins below {m['basin_threshold']}: {m['basins']}"
        )


if __name__ == "__main__":
    main()
