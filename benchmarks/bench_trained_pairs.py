"""What trained pairs reach: the figures the tests do not assert, because they differ between
CPUs, thread counts and seeds (the tests assert guarantees only).

Trains the test suite's small pairs (MLP 2 x 128 and a BatchNorm MLP 3 x 128 on MNIST-1D, 8
epochs; a third MLP for MergeMany; two tiny GPT-2s on a Markov language) for each seed pair and
prints: the naive and aligned test loss barriers, the midpoint accuracy with BatchNorm statistics
interpolated, reset and repaired, MergeMany against the naive average, and the language models'
barriers.

Usage: python benchmarks/bench_trained_pairs.py [--seeds 0 1 2] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rebasin.checkpoint import load_checkpoint
from rebasin.commands.train import train_checkpoint
from rebasin.data import load_data
from rebasin.evaluate.paths import PathEvaluator, alpha_grid
from rebasin.matching import MergeMany, match
from rebasin.merge import average
from rebasin.models.resolve import resolve_model
from rebasin.permutation import permute
from rebasin.spec import infer_spec

MLP = {"in_features": 40, "hidden": 128, "depth": 2, "num_classes": 10}
BN = {**MLP, "depth": 3, "norm": "bn"}


def trained(out: Path, name: str, args: dict, seed: int) -> Path:
    p = out / f"{name}-{seed}.safetensors"
    if not p.exists():
        train_checkpoint("mlp", args, "mnist1d", p, seed=seed, epochs=8, force=True)
    return p


def evaluator(path: Path, bn: str = "none") -> PathEvaluator:
    ck = load_checkpoint(path)
    ref = resolve_model(None, None, ck.metadata, str(path))
    return PathEvaluator(ref.factory(), load_data("mnist1d"), bn=bn, model_name=ref.name)


def mlp_rows(out: Path, s: int) -> None:
    pa, pb = trained(out, "mlp", MLP, s), trained(out, "mlp", MLP, s + 1)
    a, b = load_checkpoint(pa), load_checkpoint(pb)
    spec = infer_spec(a.shapes)
    aligned_b = permute(b.state, spec, match(a.state, b.state, spec, restarts=3).perm)
    ev, grid = evaluator(pa), alpha_grid(11)
    naive, aligned = ev.curve(a.state, b.state, grid), ev.curve(a.state, aligned_b, grid)
    nb, ab = (c.barriers()["test"]["loss"]["linear"] for c in (naive, aligned))
    print(
        f"  MLP 2x128: test loss barrier naive {nb:.3f}, aligned {ab:.3f} ({ab / nb:.0%} of naive); "
        f"midpoint acc naive {naive.acc['test'][5]:.3f}, aligned {aligned.acc['test'][5]:.3f}"
    )
    pc = trained(out, "mlp", MLP, s + 2)
    states = [load_checkpoint(p).state for p in (pa, pb, pc)]
    r = MergeMany(seed=0).match(states, spec)
    merged = average([permute(x, spec, p) for x, p in zip(states, r.perms, strict=True)])
    plain = average(states)
    lm, ln = (ev.curve(m, m, [0.0]).loss["test"][0] for m in (merged, plain))
    print(f"  MergeMany of 3: test loss {lm:.3f} against the naive average's {ln:.3f}")


def bn_rows(out: Path, s: int) -> None:
    pa, pb = trained(out, "bn", BN, s), trained(out, "bn", BN, s + 1)
    a, b = load_checkpoint(pa), load_checkpoint(pb)
    spec = infer_spec(a.shapes)
    aligned_b = permute(b.state, spec, match(a.state, b.state, spec).perm)
    accs = {}
    for bn in ("none", "reset", "repair"):
        c = evaluator(pa, bn).curve(a.state, aligned_b, [0.0, 0.5, 1.0])
        accs[bn] = c.acc["test"]
    ends = min(accs["reset"][0], accs["reset"][2])
    print(
        f"  BN MLP 3x128, aligned midpoint test acc: interpolated statistics {accs['none'][1]:.3f}, "
        f"reset {accs['reset'][1]:.3f}, REPAIR {accs['repair'][1]:.3f} (endpoints >= {ends:.3f})"
    )


def markov(n: int, seed: int, vocab: int = 50, length: int = 16) -> torch.Tensor:
    """Token sequences of a fixed random Markov chain (3 likely successors per token)."""
    nxt = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, vocab, (n,), generator=g)]
    while len(cols) < length:
        cols.append(nxt[cols[-1], torch.randint(0, 3, (n,), generator=g)])
    return torch.stack(cols, 1)


def lm_rows(out: Path, s: int) -> None:
    try:
        import numpy as np
        import transformers as t
    except ImportError:
        print("  tiny GPT-2s: skipped (transformers is not installed)")
        return
    from rebasin import barrier_checkpoints, build_options

    t.logging.set_verbosity_error()
    t.logging.disable_progress_bar()
    folders = []
    for seed in (s, s + 1):
        torch.manual_seed(seed)
        model = t.GPT2LMHeadModel(
            t.GPT2Config(
                n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
            )
        )
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data, g = markov(2048, seed), torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(60):
            batch = data[torch.randint(0, len(data), (32,), generator=g)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        folders.append(out / f"lm-{seed}")
        model.save_pretrained(folders[-1])
    tokens = out / f"tokens-{s}.npz"
    np.savez(tokens, input_ids=markov(400, 5).numpy(), input_ids_test=markov(200, 6).numpy())
    opts = build_options({"data": str(tokens), "alphas": 5, "budget": 1.0}, "barrier")
    paths = barrier_checkpoints(folders[0], folders[1], opts)["evaluation"]["paths"]
    nb, ab = (paths[p]["barriers"]["test"]["loss"]["linear"] for p in ("naive", "aligned"))
    print(f"  tiny GPT-2s: next-token loss barrier naive {nb:.3f}, aligned {ab:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="first seed of each pair")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("rebasin-bench/trained-pairs"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for s in args.seeds:
        print(f"seeds {s} and {s + 1} ({torch.get_num_threads()} threads):", flush=True)
        mlp_rows(args.out, s)
        bn_rows(args.out, s)
        lm_rows(args.out, s)


if __name__ == "__main__":
    main()
