"""Align and merge two small GPT-2 language models trained from different seeds.

Trains two tiny GPT-2s (Hugging Face ``transformers``, built from a config: nothing downloaded) on
a synthetic language (a sparse random Markov chain), saves them as model directories, merges them
with the rebasin CLI, and measures the next-token loss along the naive and the aligned paths with
``rebasin barrier --data tokens.npz``.

    python examples/merge_gpt2.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB, SEQ = 48, 32


def language(n: int, seed: int) -> torch.Tensor:
    """Sequences of a sparse Markov chain: every token has 3 likely successors."""
    g = torch.Generator().manual_seed(1234)  # one language for every model
    succ = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, SEQ, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, SEQ):
        x[:, t] = succ[x[:, t - 1], torch.randint(0, 3, (n,), generator=g)]
    return x


def make_model(seed: int) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def train(seed: int, steps: int, out: Path) -> None:
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = language(4096, seed=seed)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (32,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer training steps")
    ap.add_argument("--out", type=Path, default=Path("gpt2-example"))
    args = ap.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("this example needs transformers: pip install 'rebasin[hf]'")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    steps = 60 if args.quick else 400
    a, b = args.out / "a", args.out / "b"
    for seed, path in ((0, a), (1, b)):
        train(seed, steps, path)
    tokens = args.out / "tokens.npz"
    np.savez(tokens, input_ids=language(512, seed=98).numpy(), input_ids_test=language(512, seed=99).numpy())
    merged = args.out / "merged"
    rebasin = [sys.executable, "-m", "rebasin"]
    subprocess.run(
        [*rebasin, "merge", str(a), str(b), "-o", str(merged), "--method", "weight", "--force", "--quiet"],
        check=True,
    )
    out = subprocess.run(
        [
            *rebasin,
            "barrier",
            str(a),
            str(b),
            "--data",
            str(tokens),
            "--alphas",
            "5",
            "--method",
            "weight",
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    paths = json.loads(out)["evaluation"]["paths"]
    alphas = paths["naive"]["alphas"]
    naive, aligned = paths["naive"]["loss"]["test"], paths["aligned"]["loss"]["test"]
    print(f"{'alpha':>6} {'naive loss':>11} {'aligned loss':>13}")
    for alpha, n, al in zip(alphas, naive, aligned, strict=True):
        print(f"{alpha:>6.2f} {n:>11.3f} {al:>13.3f}")
    bar = {k: paths[k]["barriers"]["test"]["loss"]["linear"] for k in ("naive", "aligned")}
    print(f"loss barrier: naive {bar['naive']:.3f}, aligned {bar['aligned']:.3f}")
    print(f"merged model (loads with from_pretrained): {merged}")


if __name__ == "__main__":
    main()
