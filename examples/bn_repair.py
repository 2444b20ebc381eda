"""Why BatchNorm reset and REPAIR matter: interpolating aligned networks shrinks hidden-unit
variance, and stored BatchNorm statistics go stale. Compare the aligned midpoint with no
correction, with BatchNorm statistics recomputed, and with REPAIR, for an MLP with BatchNorm and
an MLP without any normalization.

    python examples/bn_repair.py [--quick] [--out DIR]
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
    ap.add_argument("--out", type=Path, default=Path("rebasin-examples/bn"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hidden, epochs, alphas = (32, 1, 3) if args.quick else (256, 15, 11)
    models = {
        "MLP + BatchNorm": (
            {"in_features": 40, "hidden": hidden, "depth": 3, "norm": "bn"},
            ("none", "reset", "repair"),
        ),
        "MLP, no norm": ({"in_features": 40, "hidden": hidden, "depth": 3}, ("none", "repair")),
    }
    print(
        f"{'model':<16} {'--bn':<7} {'aligned test barrier':>21} "
        + f"{'aligned mid acc':>16} {'naive mid acc':>14}"
    )
    for label, (arch, modes) in models.items():
        paths = []
        for seed in (0, 1):
            p = args.out / f"{label.split()[0]}_{arch.get('norm', 'none')}_{seed}.safetensors"
            train_checkpoint("mlp", arch, "mnist1d", p, seed=seed, epochs=epochs, force=True)
            paths.append(p)
        for bn in modes:
            rep = barrier_checkpoints(
                *paths, Options(match=WeightMatching(restarts=3), evaluate=EvalOptions(alphas=alphas, bn=bn))
            )
            paths_ = rep["evaluation"]["paths"]
            mid = len(paths_["aligned"]["alphas"]) // 2
            aligned, naive = paths_["aligned"], paths_["naive"]
            print(
                f"{label:<16} {bn:<7} {aligned['barriers']['test']['loss']['linear']:>21.3f} "
                f"{100 * aligned['acc']['test'][mid]:>15.1f}% {100 * naive['acc']['test'][mid]:>13.1f}%"
            )


if __name__ == "__main__":
    main()
