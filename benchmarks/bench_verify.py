"""The cost of verified writes: ``rebasin merge`` of two GPT-2 small directories (random inits
built from the config, nothing downloaded), with the time of each stage from the report.

    python benchmarks/bench_verify.py [--small] [--out DIR]

``--small`` uses a 4-layer, d=128 GPT-2 instead (seconds)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
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

        plain = merge("--no-verify")
        rep = merge()
        tm, eq = rep["timings"], rep["equivalence"]
        base = plain["timings"]["total_s"]
        print(f"model: {'GPT-2 4 x 128' if args.small else 'GPT-2 small (124M)'}")
        print("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in tm.items()))
        print(f"verification after matching: {tm['verify_s']:.2f} s (the model is built while matching runs)")
        extra = tm["total_s"] - base
        print(
            f"merge {tm['total_s']:.1f} s verified vs {base:.1f} s with --no-verify: "
            f"{extra:+.1f} s ({100 * extra / base:+.1f}%)"
        )
        print(f"equivalence: ok={eq['ok']} max_abs_diff={eq['max_abs_diff']:.2e} on {eq['probe']}")


if __name__ == "__main__":
    main()
