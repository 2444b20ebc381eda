"""Merging models trained on different tasks into one model of a chosen width (PLeaS).

Trains two MLPs on scikit-learn's digits: A on digits 0-4, B on digits 5-9 (each with a 5-way
head). Then, for merged widths from 1.0 (every unit merged) to 2.0 (nothing merged: the two
models side by side), ``rebasin merge --method pleas --task-heads separate`` builds one model
that keeps both heads and answers each task with its own, and reports each task's accuracy
beside A and B, the aligned average and the partial merge before least squares.

    python examples/pleas_merge.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rebasin import build_options, merge_checkpoints
from rebasin.commands.train import train_checkpoint
from rebasin.data import load_data


def split_digits(out: Path) -> tuple[Path, Path]:
    """Digits 0-4 and 5-9 as two data files (labels 0-4 in each)."""
    d = load_data("digits", 0)
    paths = []
    for name, lo in (("low", 0), ("high", 5)):
        keep, keep_t = (d.y_train >= lo) & (d.y_train < lo + 5), (d.y_test >= lo) & (d.y_test < lo + 5)
        path = out / f"digits_{name}.npz"
        np.savez(
            path,
            x=d.x_train[keep].numpy(),
            y=(d.y_train[keep] - lo).numpy(),
            x_test=d.x_test[keep_t].numpy(),
            y_test=(d.y_test[keep_t] - lo).numpy(),
        )
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    ap.add_argument("--out", type=Path, default=Path("rebasin-examples/pleas"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    epochs, widths = (2, (1.0, 2.0)) if args.quick else (30, (1.0, 1.25, 1.5, 2.0))
    low, high = split_digits(args.out)
    arch = {"in_features": 64, "hidden": 128, "depth": 2, "num_classes": 5}
    models = []
    for seed, data in ((1, low), (2, high)):
        path = args.out / f"mlp_{data.stem}.safetensors"
        train_checkpoint("mlp", arch, str(data), path, seed=seed, epochs=epochs, force=True)
        models.append(path)
    print(f"{'width':>5} {'params':>7}  {'task':<8} {'A/B':>6} {'average':>8} {'no l.sq.':>8} {'PLeaS':>6}")
    for w in widths:
        values = {"method": "pleas", "width": w, "task_heads": "separate", "data": str(low)}
        opts = build_options({**values, "data_b": str(high), "force": True}, "merge")
        out = args.out / f"merged_{w}.safetensors"
        report = merge_checkpoints(models[0], models[1], out, opts)
        params = report["pleas"]["parameters"]
        for task, row in report["tasks"].items():
            accs = [row[name]["acc"] for name in (task, "average", "placed", "pleas")]
            digits = "0-4" if task == "a" else "5-9"
            print(
                f"{w:5.2f} {params['merged'] / params['a']:6.2f}x  digits {digits}"
                f" {accs[0]:6.3f} {accs[1]:8.3f} {accs[2]:8.3f} {accs[3]:6.3f}"
            )


if __name__ == "__main__":
    main()
