"""Weight-matching speed: time vs width and depth, on random and trained-like pairs; LAP time per
group per back-end. Prints medians of repeated runs. Usage: python benchmarks/bench_weight_matching.py
[--quick]"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch

from rebasin.matching import WeightMatching
from rebasin.matching.assignment import solve_assignment
from rebasin.permutation import permute, random_permutation
from rebasin.spec import infer_spec


def mlp_state(width: int, depth: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dims = [40] + [width] * depth + [10]
    state = {}
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        state[f"net.{2 * i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        state[f"net.{2 * i}.bias"] = torch.randn(b, generator=g) * 0.1
    return state


def trained_like(a: dict[str, torch.Tensor], seed: int, noise: float = 0.7) -> dict[str, torch.Tensor]:
    """B = a random permutation of A plus noise: correlated like two trained nets, not identical."""
    spec = infer_spec(a)
    g = torch.Generator().manual_seed(seed + 1000)
    pb = permute(a, spec, random_permutation(spec, seed))
    return {k: v + noise * v.std() * torch.randn(v.shape, generator=g) for k, v in pb.items()}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    widths = [256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096]
    print(f"torch threads: {torch.get_num_threads()}, backend: {args.backend}")
    print("\nweight matching, MLP depth 3 (median seconds, sweeps)")
    print(f"{'width':>6} {'random':>10} {'sweeps':>7} {'trained-like':>13} {'sweeps':>7}")
    for w in widths:
        a = mlp_state(w, 3, 0)
        row = [f"{w:>6}"]
        for b in (mlp_state(w, 3, 1), trained_like(a, 1)):
            spec = infer_spec(a)
            solver = WeightMatching(backend=args.backend)
            reps = 3 if w <= 1024 else 1
            t = timed(lambda a=a, b=b, spec=spec, solver=solver: solver.match(a, b, spec), reps)
            sweeps = solver.match(a, b, spec).restarts[0].sweeps if reps > 1 else "-"
            row += [f"{t:>10.3f}" if len(row) == 1 else f"{t:>13.3f}", f"{sweeps!s:>7}"]
        print(" ".join(row))
    print("\nweight matching vs depth, width 512, trained-like (median seconds)")
    for depth in [2, 4, 8] if args.quick else [2, 4, 8, 16]:
        a = mlp_state(512, depth, 0)
        b = trained_like(a, 1)
        spec = infer_spec(a)
        t = timed(lambda a=a, b=b, spec=spec: WeightMatching(backend=args.backend).match(a, b, spec), 3)
        print(f"  depth {depth:>2}: {t:.3f}")
    print("\nLAP time for one n x n group (median ms): random costs / weight-matching-like costs")
    rng = np.random.default_rng(0)
    print(f"{'n':>6} {'scipy rnd':>10} {'lap rnd':>9} {'scipy wm':>9} {'lap wm':>8}")
    for n in widths:
        c_rand = rng.standard_normal((n, n))
        x = rng.standard_normal((n, 64))
        c_wm = x @ (x[rng.permutation(n)] + 0.8 * rng.standard_normal((n, 64))).T
        reps = 5 if n <= 1024 else 2
        cells = []
        for c in (c_rand, c_wm):
            for be in ("scipy", "lap"):
                cells.append(1000 * timed(lambda c=c, be=be: solve_assignment(c, be), reps))
        print(f"{n:>6} {cells[0]:>10.1f} {cells[1]:>9.1f} {cells[2]:>9.1f} {cells[3]:>8.1f}")


if __name__ == "__main__":
    main()
