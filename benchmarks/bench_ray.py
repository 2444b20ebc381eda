"""A plan of 8 items (weight-matching merges with a barrier on MNIST-1D), run serially and with
``--ray local``: wall time of each, their ratio, and the driver's overhead per task (Ray's
start-up and scheduling: a plan of 8 trivial barrier items). Usage:
python benchmarks/bench_ray.py [--out DIR] [--items N]"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from rebasin.demo import DEMO_MODEL, train_checkpoint


def plan(folder: Path, a: Path, b: Path, items: int, alphas: int, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "format_version: 1",
        f"defaults: {{alphas: {alphas}, method: weight, data: mnist1d, force: true}}",
        "items:",
    ]
    for i in range(items):
        lines.append(f"  - {{name: i{i}, a: {a}, b: {b}, seed: {i}, output: {tag}{i}.safetensors}}")
    p = folder / f"{tag}.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def wall(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rebasin", *args], check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("rebasin-bench-ray"))
    ap.add_argument("--items", type=int, default=8)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pair = []
    for seed in (0, 1):
        p = args.out / f"mlp{seed}.safetensors"
        if not p.exists():
            train_checkpoint("mlp", DEMO_MODEL, "mnist1d", p, seed=seed, epochs=20, force=True)
        pair.append(p.resolve())
    work = plan(args.out / "work", *pair, args.items, 11, "m")
    serial = wall(["batch", str(work), "--quiet"])
    ray = wall(["batch", str(work), "--quiet", "--ray", "local"])
    print(
        f"{args.items} items (merge + 11-alpha barrier each): serial {serial:.1f} s, "
        f"--ray local {ray:.1f} s, "
        f"ratio {serial / ray:.2f}"
    )
    trivial = plan(args.out / "trivial", *pair, args.items, 2, "t")
    t_serial = wall(["batch", str(trivial), "--quiet"])
    t_ray = wall(["batch", str(trivial), "--quiet", "--ray", "local"])
    print(
        f"{args.items} trivial items (2 alphas): serial {t_serial:.1f} s, --ray local {t_ray:.1f} s; "
        f"driver overhead {(t_ray - t_serial) / args.items:.2f} s per task (Ray start-up included)"
    )


if __name__ == "__main__":
    main()
