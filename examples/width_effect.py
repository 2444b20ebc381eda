"""Wider networks connect better after alignment: ResNet-20 at widths 1, 2 and 4 on the digits
images, two seeds each, BatchNorm statistics reset along the path.

    python examples/width_effect.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rebasin import Options, WeightMatching, barrier_checkpoints
from rebasin.commands.train import train_checkpoint
from rebasin.options import EvalOptions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    ap.add_argument("--out", type=Path, default=Path("rebasin-examples/width"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    widths, epochs, alphas = ((1,), 1, 3) if args.quick else ((1, 2, 4), 15, 11)
    print(
        f"{'width':>5} {'test acc A/B':>13} {'naive barrier':>14} "
        + f"{'aligned barrier':>16} {'aligned mid acc':>16}"
    )
    for w in widths:
        arch = {"width": w, "in_channels": 1, "num_classes": 10}
        paths = []
        for seed in (0, 1):
            p = args.out / f"resnet20_w{w}_s{seed}.safetensors"
            train_checkpoint("resnet20", arch, "digits", p, seed=seed, epochs=epochs, lr=3e-3, force=True)
            paths.append(p)
        rep = barrier_checkpoints(
            *paths, Options(match=WeightMatching(restarts=3), evaluate=EvalOptions(alphas=alphas, bn="reset"))
        )
        ev = rep["evaluation"]
        nb = ev["paths"]["naive"]["barriers"]["test"]["loss"]["linear"]
        ab = ev["paths"]["aligned"]["barriers"]["test"]["loss"]["linear"]
        mid = ev["paths"]["aligned"]["acc"]["test"][len(ev["paths"]["aligned"]["alphas"]) // 2]
        ends = ev["endpoints"]
        accs = f"{100 * ends['a']['test']['acc']:.1f}/{100 * ends['b']['test']['acc']:.1f}"
        print(f"{w:>5} {accs:>13} {nb:>14.3f} {ab:>16.3f} {100 * mid:>15.1f}%")


if __name__ == "__main__":
    main()
