"""Planted-permutation recovery rate on the ResNet family, with and without restarts.

For each trial: build a ResNet with a fresh seed (BatchNorm statistics warmed up), draw a random
permutation, and ask weight matching to undo it. A trial succeeds when every group is recovered
exactly. Usage: python benchmarks/bench_recovery.py [--trials N]"""

from __future__ import annotations

import argparse
import time

import torch

from rebasin.matching import match
from rebasin.models import build_model
from rebasin.permutation import invert, permute, random_permutation
from rebasin.spec import infer_spec

CONFIGS = {
    "resnet20 (w=1)": dict(name="resnet20", width=1),
    "resnet20 (w=4)": dict(name="resnet20", width=4),
    "resnet bottleneck": dict(name="resnet", blocks=(2, 2), widths=(16, 32), bottleneck=True),
}


def state_for(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    kw = {k: v for k, v in cfg.items() if k != "name"}
    torch.manual_seed(seed)
    m = build_model(cfg["name"], **kw).train()
    with torch.no_grad():
        m(torch.randn(16, 3, 8, 8))
    return m.state_dict()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    print(f"{'model':<20} {'restarts':>8} {'recovered':>10} {'groups exact':>13} {'seconds/trial':>14}")
    for label, cfg in CONFIGS.items():
        for restarts in (1, 5):
            ok = groups_ok = groups_total = 0
            t0 = time.perf_counter()
            for trial in range(args.trials):
                a = state_for(cfg, trial)
                spec = infer_spec(a)
                p = random_permutation(spec, 10_000 + trial)
                b = dict(permute(a, spec, p))
                r = match(a, b, spec, restarts=restarts, seed=trial)
                want = invert(p)
                exact = [torch.equal(r.perm[g], want[g]) for g in spec.sizes]
                ok += all(exact)
                groups_ok += sum(exact)
                groups_total += len(exact)
            dt = (time.perf_counter() - t0) / args.trials
            print(
                f"{label:<20} {restarts:>8} {ok:>4}/{args.trials:<5} "
                f"{100 * groups_ok / groups_total:>12.1f}% {dt:>14.3f}"
            )


if __name__ == "__main__":
    main()
