"""Linear assignment back-ends: maximize ``sum_i C[i, p[i]]`` over permutations ``p``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment

from rebasin.core.errors import ConfigError
from rebasin.spec.core import Heads, PermutationSpec

BACKENDS = ("auto", "scipy", "lap")


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


def solve_assignment(cost: np.ndarray, backend: str = "auto", near: np.ndarray | None = None) -> np.ndarray:
    """Return ``p`` (int64) maximizing ``sum_i cost[i, p[i]]`` for a square float matrix.
    ``near``: a permutation believed close to the optimum (a hint for speed only)."""
    c = np.asarray(cost)
    if c.dtype not in (np.float32, np.float64):
        c = c.astype(np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cost must be square, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("cost matrix holds NaN or Inf")
    if not c.size:
        return np.zeros(0, dtype=np.int64)
    best = c.argmax(axis=1)
    if np.bincount(best, minlength=len(c)).max() == 1:
        # every row's best column, all different: no assignment sums more (aligned models,
        # such as two fine-tunes of one base, and planted pairs), found in one pass
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
) -> dict[str, np.ndarray]:
    """Maximize ``sum_g sum_i costs[g][i, p_g[i]]`` over the permutations of a unit of groups.

    A group without heads is one plain assignment. Groups with heads (all with the same count K,
    moving their heads together) take the exact two-level assignment: for every head pair (i, j)
    and group, an inner assignment of the head's units gives the best within-head matching and
    its value; the values summed over the groups form a K x K head cost, whose assignment picks
    the heads; each group's permutation is then the chosen heads with their inner matchings.
    ``near``: permutations of plain groups believed close to the optimum (for speed only)."""
    if not any(g in heads for g in costs):
        return {g: solve_assignment(c, backend, (near or {}).get(g)) for g, c in costs.items()}
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
