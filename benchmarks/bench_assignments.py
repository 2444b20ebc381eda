"""Weight matching's assignments solved at once (``--assign-workers``) against one at a time.

Costs of independent pairs are close to Gaussian (sums of many products of unrelated weights),
so K standard-normal n x n costs stand for one stage of a transformer's MLP groups (n 5632 at
the TinyLlama shape, 11008 at LLaMA-7B; no assignment can be read off their rows). Each is
solved through :func:`rebasin.matching.assignment.solve_unit`, as the search solves a unit:
one after another with LAPJV (the default one at a time) and with scipy, then 2, 4, ... at
once up to the cores here: LAPJV in worker processes (the default at once; started before the
clock, as a run starts them at its first stage) and scipy in threads (it releases the
interpreter lock), and the exact auction (``--backend auction``) one at a time, on the GPU when
there is one (a warm-up solve off the clock). Prints seconds per stage and the speed-up over
LAPJV one at a time, and checks every way gives the same permutations.

    python benchmarks/bench_assignments.py [--sizes 2048 5632] [--count 8] [--no-auction]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rebasin.matching.assignment import (
    AUCTION,
    AUCTION_MIN,
    PROCESSES,
    resolve_backend,
    solve_unit,
    usable_cores,
)
from rebasin.matching.lapjv_workers import LapjvWorkers


def stage_seconds(costs: list[np.ndarray], backend: str, workers: int) -> tuple[float, list[np.ndarray]]:
    """Seconds to solve every cost, ``workers`` at a time, and the answers in order."""

    def unit(c: np.ndarray) -> np.ndarray:
        return solve_unit({"g": c}, {}, backend)["g"]

    if workers == 1:
        return timed(lambda: [unit(c) for c in costs])
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(workers))
        solve = unit
        if backend == PROCESSES:
            procs = stack.enter_context(contextlib.closing(LapjvWorkers(workers)))
            list(pool.map(procs.solve, [c[:2, :2] for c in costs[:workers]]))  # started off the clock
            solve = procs.solve
        return timed(lambda: list(pool.map(solve, costs)))


def auction_device() -> str:
    """Where the auction solves, after a warm-up solve there (kernels loaded, off the clock)."""
    import torch

    solve_unit({"g": np.random.default_rng(0).standard_normal((AUCTION_MIN, AUCTION_MIN))}, {}, AUCTION)
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def timed(work: Callable[[], list[np.ndarray]]) -> tuple[float, list[np.ndarray]]:
    t = time.perf_counter()
    out = work()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[2048, 5632])
    ap.add_argument("--count", type=int, default=8, help="costs in the stage")
    ap.add_argument("--no-auction", action="store_true", help="leave out the auction")
    args = ap.parse_args()
    cores = usable_cores()
    one = resolve_backend("auto")
    print(f"{cores} cores; one at a time with {one}; at once in worker processes (LAPJV) and scipy threads")
    print(f"{'n':>6} {'way':<18} {'stage s':>8} {'per solve s':>11} {'speed-up':>8}")
    for n in args.sizes:
        rng = np.random.default_rng(n)
        costs = [rng.standard_normal((n, n), dtype=np.float32) for _ in range(args.count)]
        base, ref = stage_seconds(costs, one, 1)
        ways = [(f"{one}, 1 at a time", one, 1)]
        if one != "scipy":
            ways.append(("scipy, 1 at a time", "scipy", 1))
        w = 2
        while w <= cores:
            if one == "lap":
                ways.append((f"lap, {w} processes", PROCESSES, w))
            ways.append((f"scipy, {w} threads", "scipy", w))
            w *= 2
        if not args.no_auction:
            ways.append((f"auction, {auction_device()}", AUCTION, 1))
        for label, backend, workers in ways:
            took, got = (
                (base, ref) if workers == 1 and backend == one else stage_seconds(costs, backend, workers)
            )
            same = all(np.array_equal(x, y) for x, y in zip(got, ref, strict=True))
            print(
                f"{n:>6} {label:<18} {took:>8.2f} {took / args.count:>11.3f} {base / took:>7.2f}x"
                + ("" if same else "  DIFFERENT PERMUTATIONS"),
                flush=True,
            )


if __name__ == "__main__":
    main()
