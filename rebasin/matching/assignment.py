"""Linear assignment back-ends: maximize ``sum_i C[i, p[i]]`` over permutations ``p``. Importing
this module imports no torch (option checks use it); the ``auction`` back-end imports it when it
solves."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

from rebasin.core.errors import ConfigError

if TYPE_CHECKING:
    from rebasin.spec.core import Heads, PermutationSpec

BACKENDS = ("auto", "scipy", "lap", "auction")

AUCTION = "auction"
"""The back-end that solves on the GPU when there is one (else with torch on the CPU): the
exact auction of :mod:`rebasin.matching.auction`, one assignment at a time, for costs of at
least :data:`AUCTION_MIN` rows, solved from scratch; smaller ones (heads' blocks, small layers)
take LAPJV or scipy here, in milliseconds, where a device's rounds of bids would each wait on a
kernel launch, and so do re-solves near a known permutation (``near``): LAPJV starts from it
(an independent TinyLlama-shape pair's whole second sweep, its re-solves and their products,
took 2.6 s on 2 cores), where the auction would start over with thousands of rounds."""

AUCTION_MIN = 1024

PROCESSES = "lap-processes"
"""The back-end of assignments solved at once where ``lap`` is installed: LAPJV in worker
processes (:mod:`rebasin.matching.lapjv_workers`). ``lap`` holds the interpreter lock, so its
threads take turns; scipy's solver releases it (two threads, two solves: 0.37 s against 0.71 s
one after the other at 2000 x 2000) but is 1.6x slower per solve, so ``scipy`` asked for by
name solves at once in threads."""

CONCURRENT_MIN = 2048
"""Smallest group for which assignments are solved at once by default: below it a solve takes
milliseconds (threads would cost more than they save) and LAPJV, faster per solve, stays."""

ASSIGN_BYTES = 16 << 30
"""Most memory the assignments solved at once take together (:func:`assignment_bytes`), and at
most a quarter of what is available when they start."""


def _have_lap() -> bool:
    try:
        import lap  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """Pick a concrete back-end: ``auto`` is ``lap`` (LAPJV, faster) when installed, else scipy."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown assignment back-end '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        return "lap" if _have_lap() else "scipy"
    if backend == "lap" and not _have_lap():
        raise ConfigError("assignment back-end 'lap' is not installed", "pip install lap")
    return backend


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _available_bytes() -> int:
    """Physical memory available now (unbounded where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return ASSIGN_BYTES * 4


def assignment_bytes(n: int, at_once: bool) -> int:
    """Memory of an n x n assignment: its float32 cost and the float64 matrix solved (12 n^2
    bytes, 1.45 GB at a LLaMA-7B MLP group of 11008); solved at once, the cost is also sent to a
    worker process (16 n^2)."""
    return (16 if at_once else 12) * n * n


def check_concurrency(workers: int) -> None:
    """``--assign-workers`` is 0 (as the machine allows) or a count."""
    if workers < 0:
        raise ConfigError(f"--assign-workers must be 0 (as the cores allow) or more, got {workers}")


def plan_concurrency(workers: int, backend: str, largest: int, products_on_cpu: bool) -> tuple[int, str]:
    """How many assignments are solved at once, and the back-end of those solved beside others:
    :data:`PROCESSES` (LAPJV in worker processes) where ``lap`` is the back-end and a plain
    ``python`` can be started, else scipy in threads.

    ``workers`` 0 is as the machine allows: where the products run on the CPU they take its
    cores, so half of them go to assignments from 6 cores (one at a time below); where they
    run on a GPU, every core but one. Only for groups of at least :data:`CONCURRENT_MIN`, and
    within :data:`ASSIGN_BYTES`."""
    check_concurrency(workers)
    backend = resolve_backend(backend)
    if backend == AUCTION:  # one device, one solve at a time
        return 1, backend
    if workers == 0:
        cores = usable_cores()
        if largest < CONCURRENT_MIN:
            workers = 1
        elif products_on_cpu:
            workers = cores // 2 if cores >= 6 else 1
        else:
            workers = max(1, cores - 1)
    budget = min(ASSIGN_BYTES, _available_bytes() // 4)
    workers = max(1, min(workers, budget // max(assignment_bytes(largest, True), 1)))
    if workers > 1 and backend == "lap":
        return workers, PROCESSES if _can_start_python() else "scipy"
    return workers, backend


def _can_start_python() -> bool:
    """Whether worker processes can be started as plain ``python`` (not from a frozen
    application, whose executable is the application itself; not an embedded interpreter)."""
    return bool(sys.executable) and not getattr(sys, "frozen", False)


def read_off(cost: np.ndarray) -> np.ndarray | None:
    """Every row's best column (int64) when they all differ, else None. Then no assignment sums
    more: aligned models (two fine-tunes of one base, planted pairs) are solved in one pass."""
    if not cost.size:
        return None
    best = cost.argmax(axis=1)
    return best.astype(np.int64) if _all_differ(best) else None


def _all_differ(cols: np.ndarray) -> bool:
    return bool(np.bincount(cols, minlength=len(cols)).max() == 1)


def solve_assignment(
    cost: np.ndarray, backend: str = "auto", near: np.ndarray | None = None, device: str | None = None
) -> np.ndarray:
    """Return ``p`` (int64) maximizing ``sum_i cost[i, p[i]]`` for a square float matrix.
    ``near``: a permutation believed close to the optimum (a hint for speed only). ``device``:
    where the ``auction`` back-end solves (a torch device; None: a GPU when there is one)."""
    c = np.asarray(cost)
    if c.dtype not in (np.float32, np.float64):
        c = c.astype(np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cost must be square, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("cost matrix holds NaN or Inf")
    if not c.size:
        return np.zeros(0, dtype=np.int64)
    if backend == AUCTION:
        if len(c) >= AUCTION_MIN and near is None:
            from rebasin.matching.auction import solve_on_device

            return solve_on_device(c, device)
        backend = "auto"
    best = c.argmax(axis=1)
    if _all_differ(best):  # read off the rows (:func:`read_off`)
        return best.astype(np.int64)
    # Minimize a reduced cost (a value per row minus the entry, then minus each column's
    # minimum): the same optimum, non-negative, with a zero in every column. The row's value is
    # its maximum (a zero in every row too): LAPJV's initialization then does most of the work,
    # 4-6x faster on weight-matching costs than on the raw negated matrix. Near the optimum, the
    # row's value at ``near`` is 1.5-2x faster still (but up to 8x slower far from it).
    # One float64 matrix is made, whatever the cost's dtype (float32 costs are upcast exactly).
    rows = c[np.arange(len(c)), best if near is None else near][:, None]
    reduced = np.subtract(rows.astype(np.float64), c, dtype=np.float64)
    reduced -= reduced.min(axis=0, keepdims=True)
    # LAPJV (``lap``) starts its searches at a fixed "large" value (1e6): past a span of about
    # 1e7 its answer is wrong (measured: Gaussian costs times 1e7). A power of two brings the
    # largest entry to [0.5, 1) exactly, which changes no comparison.
    top = float(reduced.max())
    if top > 0:
        reduced *= 2.0 ** -np.frexp(top)[1]
    if resolve_backend(backend) == "lap":
        import lap

        _, x, _ = lap.lapjv(reduced, extend_cost=False)
        return np.asarray(x, dtype=np.int64)

    _, cols = linear_sum_assignment(reduced)
    return np.asarray(cols, dtype=np.int64)


def solve_unit(
    costs: Mapping[str, np.ndarray],
    heads: Mapping[str, Heads],
    backend: str = "auto",
    near: Mapping[str, np.ndarray] | None = None,
    device: str | None = None,
) -> dict[str, np.ndarray]:
    """Maximize ``sum_g sum_i costs[g][i, p_g[i]]`` over the permutations of a unit of groups.

    A group without heads is one plain assignment. Groups with heads (all with the same count K,
    moving their heads together) take the exact two-level assignment: for every head pair (i, j)
    and group, an inner assignment of the head's units gives the best within-head matching and
    its value; the values summed over the groups form a K x K head cost, whose assignment picks
    the heads; each group's permutation is then the chosen heads with their inner matchings.
    ``near``: permutations of plain groups believed close to the optimum (for speed only);
    ``device``: as :func:`solve_assignment` takes it."""
    if not any(g in heads for g in costs):
        return {g: solve_assignment(c, backend, (near or {}).get(g), device) for g, c in costs.items()}
    counts = {heads[g].count for g in costs}
    if len(counts) != 1 or any(g not in heads for g in costs):
        raise ValueError("a unit of groups must share one head count")
    k = counts.pop()
    head_cost = np.zeros((k, k))
    inner: dict[str, np.ndarray | None] = {}
    for g, c in costs.items():
        d = c.shape[0] // k
        if d == 1:
            head_cost += c
            inner[g] = None
            continue
        blocks = np.ascontiguousarray(c.reshape(k, d, k, d).transpose(0, 2, 1, 3))
        best = np.empty((k, k, d), dtype=np.int64)
        rows = np.arange(d)
        for i in range(k):
            for j in range(k):
                p = solve_assignment(blocks[i, j], backend)
                best[i, j] = p
                head_cost[i, j] += blocks[i, j][rows, p].sum(dtype=np.float64)
        inner[g] = best
    sigma = solve_assignment(head_cost, backend)
    out = {}
    for g, c in costs.items():
        d = c.shape[0] // k
        tau = inner[g]
        if tau is None:
            out[g] = sigma.copy()
        else:
            out[g] = np.concatenate([sigma[i] * d + tau[i, sigma[i]] for i in range(k)])
    return out


def solve_groups(
    costs: Mapping[str, np.ndarray], spec: PermutationSpec, backend: str = "auto"
) -> dict[str, np.ndarray]:
    """:func:`solve_unit` over every unit of ``spec`` that ``costs`` covers (tied head groups
    solved jointly)."""
    out: dict[str, np.ndarray] = {}
    for unit in spec.units:
        if all(g in costs for g in unit):
            out.update(solve_unit({g: costs[g] for g in unit}, spec.heads, backend))
    return out
