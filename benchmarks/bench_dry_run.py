"""How close ``--dry-run``'s estimates come to the real run: for each pair and command, the
estimated and the measured wall time and peak memory (the command's own process; the
verification worker is apart), and their ratios (the goal: within 2x).

Pairs: the demo MLP pair (trained here, or reused), and LLaMA-shaped planted pairs written by
``bench_scale.py`` (``--shapes tiny small``).

    python benchmarks/bench_dry_run.py [--shapes tiny small] [--dir /tmp/rebasin-dry]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import PEAK, make_pair

from rebasin.commands.demo import DEMO_DATA, DEMO_MODEL
from rebasin.commands.train import train_checkpoint


def rebasin(args: list[str]) -> tuple[dict, float, float]:
    """Run the command line in a child: its JSON output, wall seconds and peak RSS (bytes)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PEAK, *args, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"rebasin {' '.join(args)} failed: {p.stderr.strip()[-1500:]}")
    kb = int(p.stderr.strip().splitlines()[-1].split()[1])
    return json.loads(p.stdout), wall, kb * 1024


def compare(label: str, args: list[str]) -> None:
    plan, _, _ = rebasin([*args, "--dry-run", "--force"])
    est = plan["estimate"] if "estimate" in plan else plan["items"][0]["estimate"]
    _, wall, peak = rebasin([*args, "--force"])
    print(
        f"{label:<42} {est['seconds']:>8.1f} {wall:>8.1f} {est['seconds'] / wall:>6.2f}x "
        f"{est['peak_bytes'] / 2**30:>8.2f} {peak / 2**30:>8.2f} {est['peak_bytes'] / peak:>6.2f}x",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["tiny", "small"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/rebasin-dry"))
    ap.add_argument("--skip-data", action="store_true", help="skip the runs with data (minutes)")
    args = ap.parse_args()
    root = args.dir
    root.mkdir(parents=True, exist_ok=True)
    a, b = root / "a.safetensors", root / "b.safetensors"
    for seed, p in ((0, a), (1, b)):
        if not p.exists():
            train_checkpoint("mlp", DEMO_MODEL, DEMO_DATA, p, seed=seed, epochs=20)
    out = str(root / "m.safetensors")
    print(f"{'run':<42} {'est s':>8} {'real s':>8} {'ratio':>7} {'est GB':>8} {'real GB':>8} {'ratio':>7}")
    compare("demo pair, merge (auto, no data)", ["merge", str(a), str(b), "-o", out])
    compare("demo pair, merge --method weight", ["merge", str(a), str(b), "-o", out, "--method", "weight"])
    compare("demo pair, barrier --method weight", ["barrier", str(a), str(b), "--method", "weight"])
    if not args.skip_data:
        compare(
            "demo pair, merge --data mnist1d (auto)",
            ["merge", str(a), str(b), "-o", out, "--data", "mnist1d"],
        )
    for shape in args.shapes:
        pa, pb, _ = make_pair(root, shape, "planted")
        target = str(root / f"{shape}-merged")
        compare(
            f"{shape} planted, merge --method weight",
            ["merge", str(pa), str(pb), "-o", target, "--method", "weight"],
        )


if __name__ == "__main__":
    main()
