"""A plan of 8 items (weight-matching merges with a barrier on MNIST-1D), run serially and with
``--ray local``: wall time of each and their ratio; then Ray's start-up time and the driver's
overhead per task (200 no-op tasks). Usage:
python benchmarks/bench_ray.py [--out DIR] [--items N]"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from rebasin.commands.demo import DEMO_MODEL, train_checkpoint


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
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    start = time.perf_counter() - t
    noop = ray.remote(num_cpus=1)(_noop)
    ray.get(noop.remote())
    t = time.perf_counter()
    ray.get([noop.remote() for _ in range(200)])
    per_task = (time.perf_counter() - t) / 200
    ray.shutdown()
    print(f"Ray start-up {start:.1f} s; driver overhead {1000 * per_task:.1f} ms per task (200 no-op tasks)")


def _noop() -> None:
    return None


if __name__ == "__main__":
    main()
