"""A star model for four MLPs trained from different seeds, checked against two held-out ones:
is the star model's barrier to a model it never saw below the barrier between two independent
models? Also the star-domain model average beside the sources' ensemble.

    python examples/star_domain.py [--quick] [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rebasin import build_options
from rebasin.commands.star import star_checkpoints
from rebasin.commands.train import train_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    ap.add_argument("--resnet", action="store_true", help="BatchNorm ResNet-20s on the digits images instead")
    ap.add_argument("--out", type=Path, default=Path("rebasin-examples/star"))
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds, epochs, steps, alphas = (range(4), 1, 10, 3) if args.quick else (range(6), 20, args.steps, 11)
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
    sources, held = paths[:-2], paths[-2:]
    values = {
        "data": data,
        "alphas": alphas,
        "star_steps": steps,
        "refresh": 50,
        "held_out": tuple(str(p) for p in held),
        "average": 10,
        "force": True,
    }
    rep = star_checkpoints(sources, args.out / "star.safetensors", build_options(values, "star"))
    b, av = rep["barriers"], rep["average"]
    print(f"star model: {steps} steps on {len(sources)} sources; test loss barriers (naive / aligned)")
    print(f"  star model's own test loss {b['star_to_sources'][0]['loss_start']:.3f}")
    for r in b["star_to_sources"]:
        print(
            f"  star -> {Path(r['model']).name} (source):   {r['naive']:.3f} / {r['aligned']:.3f}"
            f"  (its loss {r['loss_end']:.3f}, aligned midpoint {r['aligned_midpoint_loss']:.3f})"
        )
    for r in b["star_to_held_out"]:
        print(
            f"  star -> {Path(r['model']).name} (held out): {r['naive']:.3f} / {r['aligned']:.3f}"
            f"  (its loss {r['loss_end']:.3f}, aligned midpoint {r['aligned_midpoint_loss']:.3f})"
        )
    for r in b["between_sources"]:
        print(
            f"  {Path(r['a']).name} -> {Path(r['b']).name}:  {r['naive']:.3f} / {r['aligned']:.3f}"
            f"  (aligned midpoint {r['aligned_midpoint_loss']:.3f})"
        )
    m = b["mean_aligned"]
    print(
        f"mean aligned: star to sources {m['star_to_sources']:.3f}, star to held out "
        f"{m['star_to_held_out']:.3f}, between sources {m['between_sources']:.3f}"
    )
    for key in ("star_domain_average", "sources_ensemble", "star_model"):
        x = av[key]
        print(f"{key:<20} acc {100 * x['acc']:.1f}%  ECE {x['ece']:.4f}  NLL {x['nll']:.4f}")


if __name__ == "__main__":
    main()
