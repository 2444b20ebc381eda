"""PLeaS against same-width averages and the ensemble, at merged widths 1.0, 1.25, 1.5 and 2.0.

Two settings, each a pair trained here with the project's trainer (scikit-learn's digits, shipped
in the package; nothing downloaded):

- (a) one task, two seeds: MLP 64 -> 2 x 128 -> 10 on all ten digits, seeds 11 / 12; and the
  same on MNIST-1D (the project's local generator; MLP 40 -> 2 x 128 -> 10, seeds 15 / 16), a
  harder task where a plain average loses more;
- (b) two tasks: the same MLP with 5-way heads, A on digits 0-4 and B on digits 5-9 (labels
  5-9 read as 0-4), seeds 13 / 14; the merged models keep both heads (``--task-heads separate``)
  and each task is scored with its own head. The features for matching and least squares come
  from both tasks' training inputs.

Per width it runs ``rebasin merge --method pleas --width W`` and reads from its report the PLeaS
model, the same partial merge before least squares ("no least squares"), the activation-matched
average and the ensemble (mean of A's and B's logits; each task's own model with separate heads).
Weight matching then averaging (width 1.0) is computed beside it. Accuracies are on each task's
test split; in (b) the figure is the mean over the two tasks.

Usage: python benchmarks/bench_pleas.py [--plot docs/img/pleas_widths.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rebasin.checkpoint import load_checkpoint
from rebasin.commands.pleas import pleas_checkpoints
from rebasin.commands.train import train_checkpoint
from rebasin.data import load_data
from rebasin.evaluate.metrics import evaluate
from rebasin.matching import match
from rebasin.models.resolve import ModelRef
from rebasin.options import build_options
from rebasin.permutation import permute
from rebasin.report.plot import plot_widths
from rebasin.spec import infer_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from pleas_merge import split_digits  # the example's split: digits 0-4 and 5-9

WIDTHS = (1.0, 1.25, 1.5, 2.0)
ARGS = {"in_features": 64, "hidden": 128, "depth": 2}
EPOCHS = 30


def _wm_average(
    a: Path, b: Path, tasks: list[tuple[str, Any]], separate: bool, args: dict[str, Any]
) -> float:
    """Weight matching, then the plain average (both heads kept when separate); mean accuracy."""
    sa, sb = dict(load_checkpoint(a).state), dict(load_checkpoint(b).state)
    spec = infer_spec(sa)
    aligned = permute(sb, spec, match(sa, sb, spec, method="weight").perm)
    ref = ModelRef("mlp", {**args, "num_classes": 5 if separate else 10})
    accs = []
    for i, (_, data) in enumerate(tasks):
        model = ref.build()
        merged = {k: (sa[k] + aligned[k]) / 2 for k in sa}
        if separate:  # the backbone averaged, each task with its own model's head
            own = sa if i == 0 else aligned
            merged |= {k: own[k] for k in ("net.4.weight", "net.4.bias")}
        model.load_state_dict(merged)
        accs.append(evaluate(model.eval(), data.x_test, data.y_test).acc)
    return float(np.mean(accs))


def _setting(
    a: Path, b: Path, data: list[str], separate: bool, args: dict[str, Any] = ARGS
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for w in WIDTHS:
        values: dict[str, Any] = {"data": data[0], "width": w}
        if separate:
            values |= {"data_b": data[1], "task_heads": "separate"}
        rep = pleas_checkpoints(a, b, None, build_options({**values, "method": "pleas"}, "merge"))
        rows[str(w)] = {
            name: float(np.mean([t[name]["acc"] for t in rep["tasks"].values() if name in t]))
            for name in ("a", "b", "average", "ensemble", "placed", "pleas")
        }
        params = rep["pleas"]["parameters"]
        rows[str(w)]["parameters"] = params["merged"] / params["a"]
        rows[str(w)]["nonzero"] = params["merged_nonzero"] / params["a"]
    tasks = [(n, load_data(d, 0)) for n, d in zip("ab", data, strict=False)]
    rows["weight_average"] = _wm_average(a, b, tasks, separate, args)
    return rows


def _panel(rows: dict[str, Any]) -> dict[str, Any]:
    first = rows[str(WIDTHS[0])]
    return {
        "PLeaS": {"widths": list(WIDTHS), "acc": [rows[str(w)]["pleas"] for w in WIDTHS]},
        "partial merge, no least squares": {
            "widths": list(WIDTHS),
            "acc": [rows[str(w)]["placed"] for w in WIDTHS],
        },
        "activation matching + average": {"widths": [1.0], "acc": [first["average"]]},
        "weight matching + average": {"widths": [1.0], "acc": [rows["weight_average"]]},
        "ensemble (2x compute)": {"widths": [2.0], "acc": [first["ensemble"]]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot", default=None, help="write the figure here (PNG and SVG)")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        same = []
        for seed in (11, 12):
            p = folder / f"same{seed}.safetensors"
            train_checkpoint("mlp", {**ARGS, "num_classes": 10}, "digits", p, seed=seed, epochs=EPOCHS)
            same.append(p)
        one_d = []
        mnist_args = {**ARGS, "in_features": 40, "num_classes": 10}
        for seed in (15, 16):
            p = folder / f"mnist1d{seed}.safetensors"
            train_checkpoint("mlp", mnist_args, "mnist1d", p, seed=seed, epochs=EPOCHS)
            one_d.append(p)
        low, high = split_digits(folder)
        split = []
        for seed, data in ((13, low), (14, high)):
            p = folder / f"task{seed}.safetensors"
            train_checkpoint("mlp", {**ARGS, "num_classes": 5}, str(data), p, seed=seed, epochs=EPOCHS)
            split.append(p)
        results = {
            "(a) digits, two seeds": _setting(same[0], same[1], ["digits"], False),
            "(a) MNIST-1D, two seeds": _setting(one_d[0], one_d[1], ["mnist1d"], False, mnist_args),
            "(b) digits 0-4 and 5-9, separate heads": _setting(
                split[0], split[1], [str(low), str(high)], True
            ),
        }
    for title, rows in results.items():
        print(f"\n{title}")
        print(f"  A {rows['1.0']['a']:.4f}  B {rows['1.0']['b']:.4f}  ensemble {rows['1.0']['ensemble']:.4f}")
        print(f"  activation matching + average {rows['1.0']['average']:.4f}")
        print(f"  weight matching + average     {rows['weight_average']:.4f}")
        print("  width  params  nonzero  no-l.sq.  PLeaS")
        for w in WIDTHS:
            r = rows[str(w)]
            sizes = f"{r['parameters']:5.2f}x  {r['nonzero']:5.2f}x"
            print(f"  {w:5.2f}  {sizes}   {r['placed']:.4f}    {r['pleas']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot_widths({title: _panel(rows) for title, rows in results.items()}, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
