"""The cost of verified writes: ``rebasin merge`` of two GPT-2 small directories (random inits
built from the config, nothing downloaded), with the time of each stage from the report.

    python benchmarks/bench_verify.py [--small] [--out DIR] [--repeat N]

``--small`` uses a 4-layer, d=128 GPT-2 instead (seconds)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="merges of each kind (medians are shown)")
    args = ap.parse_args()
    import transformers as t

    cfg = t.GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=1000) if args.small else t.GPT2Config()
    with tempfile.TemporaryDirectory() as tmp:
        d = args.out or Path(tmp)
        for i, name in enumerate(("a", "b")):
            torch.manual_seed(i)
            t.GPT2LMHeadModel(cfg).save_pretrained(d / name)

        def merge(*extra: str) -> dict:
            cmd = [sys.executable, "-m", "rebasin", "merge", d / "a", d / "b", "-o", d / "merged", "--json"]
            r = subprocess.run([*cmd, "--force", *extra], capture_output=True, text=True, check=True)
            return dict(json.loads(r.stdout))

        runs: dict[str, list[dict]] = {"plain": [], "verified": []}
        for _ in range(args.repeat):  # alternating, so drifts in the machine's speed hit both alike
            runs["plain"].append(merge("--no-verify"))
            runs["verified"].append(merge())
        eq = runs["verified"][-1]["equivalence"]
        print(f"model: {'GPT-2 4 x 128' if args.small else 'GPT-2 small (124M)'}, {args.repeat} runs each")
        for name, reps in runs.items():
            keys = reps[0]["timings"]
            stages = ", ".join(f"{k} {_median(reps, k):.2f}" for k in keys)
            print(f"{name:>9} median stage seconds: {stages}")
        plain, verified = _median(runs["plain"], "total_s"), _median(runs["verified"], "total_s")
        extra = verified - plain
        print(
            f"merge {verified:.1f} s verified vs {plain:.1f} s with --no-verify (medians): "
            f"{extra:+.1f} s ({100 * extra / plain:+.1f}%)"
        )
        print(f"equivalence: ok={eq['ok']} max_abs_diff={eq['max_abs_diff']:.2e} on {eq['probe']}")


def _median(reports: list[dict], key: str) -> float:
    return statistics.median(r["timings"].get(key, 0.0) for r in reports)


if __name__ == "__main__":
    main()
