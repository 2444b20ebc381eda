"""How a test would fare on other machines: run chosen tests over several training seeds and torch
thread counts (each run a fresh pytest process) and print which combinations pass.

The trained fixtures of the suite take their seeds from ``REBASIN_TEST_SEED`` (added x10) and
the suite sets ``torch.set_num_threads`` from ``REBASIN_TEST_THREADS``. A test that asserts a
guarantee passes everywhere; one that asserts a figure of a trained pair fails somewhere.

Usage: python benchmarks/bench_test_stability.py TEST_ID [TEST_ID ...] [--seeds 0 1 2] [--threads 1 2]
e.g.   python benchmarks/bench_test_stability.py tests/test_barrier.py --seeds 0 1 2 3 --threads 1 2 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tests: list[str], seed: int, threads: int) -> tuple[bool, float, str]:
    env = {**os.environ, "REBASIN_TEST_SEED": str(seed), "REBASIN_TEST_THREADS": str(threads)}
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED") or " passed" in ln]
    return r.returncode == 0, time.perf_counter() - t, (lines[0] if lines else r.stdout[-200:]).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tests", nargs="+", help="pytest node ids or files")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"{'seed':>4} {'threads':>7} {'result':>6} {'s':>6}  first line")
    failed = 0
    for seed in args.seeds:
        for threads in args.threads:
            ok, seconds, line = run(args.tests, seed, threads)
            failed += not ok
            print(f"{seed:>4} {threads:>7} {'pass' if ok else 'FAIL':>6} {seconds:>6.1f}  {line}", flush=True)
    total = len(args.seeds) * len(args.threads)
    print(f"\n{total - failed} of {total} combinations passed")


if __name__ == "__main__":
    main()
