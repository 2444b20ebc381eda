"""Small trained pairs, matched on one thread: where the time goes when the products are tiny.

Trains two pairs with a recipe of its own (a plain PyTorch loop, not the project's trainer:
other seeds, optimizers and widths than the tests and the other benchmarks):

- MNIST-1D, MLP 40 -> 3 x 512 -> 10, Adam 1e-3, batch 64, 25 epochs, seeds 101 / 202;
- scikit-learn digits, MLP 64 -> 2 x 256 -> 10 (85k parameters), SGD 0.05 momentum 0.9,
  batch 32, 30 epochs, seeds 7 / 8;

then times, on one thread, median of repeats:

- ``rebasin.match(method="weight")`` (one run from the identity), and a 40-line textbook weight
  matching (Git Re-Basin's Algorithm 1 with scipy, recomputing every product each step) as a
  reference: both must give the same permutation;
- ``--method sinkhorn`` (l2 cost, 100 steps) with its barrier-free criterion ||A - pi(B)||, and
  where the time goes (projection iterations per step, early and late).

Usage: python benchmarks/bench_small_pairs.py [--repeats 5] [--skip-sinkhorn]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import statistics
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import rebasin
from rebasin.data import load_data
from rebasin.spec import PermutationSpec, infer_spec


def mlp(dims: list[int]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def train(
    data: str, dims: list[int], seed: int, epochs: int, batch: int, opt: str
) -> dict[str, torch.Tensor]:
    ds = load_data(data)
    x, y = ds.x_train.reshape(len(ds.x_train), -1), ds.y_train
    torch.manual_seed(seed)
    net = mlp(dims)
    o: torch.optim.Optimizer
    if opt == "adam":
        o = torch.optim.Adam(net.parameters(), lr=1e-3)
    else:
        o = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            o.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            o.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def textbook(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], spec: PermutationSpec, seed: int = 0):
    """Git Re-Basin Algorithm 1 as usually written: every step recomputes the group's products."""
    perm = {g: torch.arange(n) for g, n in spec.sizes.items()}
    rng = np.random.default_rng(seed)
    names = list(spec.sizes)
    for _ in range(100):
        progress = False
        for i in rng.permutation(len(names)):
            g = names[int(i)]
            n = spec.sizes[g]
            c = torch.zeros(n, n)
            for m in spec.groups[g]:
                wa, wb = a[m.param], b[m.param]
                for ax, e in enumerate(spec.axes_to_perm[m.param]):
                    if e is not None and e.group != g:
                        wb = wb.index_select(ax, perm[e.group])
                wa, wb = wa.movedim(m.axis, 0).reshape(n, -1), wb.movedim(m.axis, 0).reshape(n, -1)
                c += wa @ wb.T
            cn = c.numpy()
            _, ci = linear_sum_assignment(cn, maximize=True)
            old = cn[np.arange(n), perm[g].numpy()].sum()
            new = cn[np.arange(n), ci].sum()
            if new > old + 1e-12:
                progress = True
                perm[g] = torch.from_numpy(ci)
        if not progress:
            break
    return perm


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-sinkhorn", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pairs = {
        "MNIST-1D 3 x 512": ("mnist1d", [40, 512, 512, 512, 10], (101, 202), 25, 64, "adam"),
        "digits 2 x 256 (85k)": ("digits", [64, 256, 256, 10], (7, 8), 30, 32, "sgd"),
    }
    print("torch threads: 1; median of", args.repeats)
    print(f"{'pair':<22} {'rebasin s':>10} {'textbook s':>11} {'same perm':>10} {'sweeps':>7}")
    trained = {}
    for name, (data, dims, seeds, epochs, batch, opt) in pairs.items():
        a, b = (train(data, dims, s, epochs, batch, opt) for s in seeds)
        trained[name] = (a, b)
        spec = infer_spec(a)
        rebasin.match(a, b, spec)  # warm the imports
        t_ours, res = median_time(functools.partial(rebasin.match, a, b, spec), args.repeats)
        t_book, book = median_time(functools.partial(textbook, a, b, spec), max(1, args.repeats // 2))
        same = all(torch.equal(res.perm[g], book[g]) for g in spec.sizes)  # type: ignore[index]
        digest = hashlib.sha256(b"".join(res.perm[g].numpy().tobytes() for g in sorted(spec.sizes)))
        print(
            f"{name:<22} {t_ours:>10.3f} {t_book:>11.3f} {same!s:>10} {len(res.history) - 1:>7}"
            f"  objective {res.objective:.6f}, permutation {digest.hexdigest()[:12]}"
        )
    if args.skip_sinkhorn:
        return
    print("\nsinkhorn l2, 100 steps, one thread")
    for name, (a, b) in trained.items():
        spec = infer_spec(a)
        t = time.perf_counter()
        res = rebasin.match(a, b, spec, method="sinkhorn", cost="l2", steps=100)
        took = time.perf_counter() - t
        wm = rebasin.match(a, b, spec)
        dist = res.objective
        print(
            f"{name:<22} {took:>7.2f} s  ||A - pi(B)|| {dist:.4f} (identity {res.objective_identity:.4f}); "
            f"weight matching's permutation agrees on "
            f"{np.mean([float((res.perm[g] == wm.perm[g]).float().mean()) for g in spec.sizes]):.1%}"
        )


if __name__ == "__main__":
    main()
