"""Exact linear assignment on a torch device (a GPU, where the costs are computed): the auction
algorithm with epsilon scaling, every unassigned row bidding at once, then a certificate that
makes the answer exact, not merely within ``n * eps`` of the optimum.

Auction (Bertsekas, "The auction algorithm: a distributed relaxation method for the assignment
problem", 1988; epsilon scaling: Bertsekas and Eckstein, 1988): each unassigned row bids for its
best column at that column's price raised by the row's margin over its second best plus ``eps``;
each column goes to its highest bidder. The prices and the assignment keep eps-complementary
slackness (every row's column is within ``eps`` of its best), so the assignment is within
``n * eps`` of the optimum. ``eps`` falls by :data:`SCALE` per phase down to
``span * FINAL_EPS / n``.

The certificate: with ``pi_i = C[i, p_i] - price[p_i]``, the slack ``pi_i + price_j - C[i, j]``
is 0 on the assignment and at least ``-eps`` elsewhere; along any cycle that turns the
assignment into a better one the slacks sum to minus the gain, so every edge of the optimum has
slack at most ``n * eps``. When no other edge is that tight, the assignment is the optimum;
otherwise the few tight edges (a sparse problem) are solved exactly by scipy's LAPJVsp on the
CPU. The costs themselves never leave their device."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

SCALE = 8.0
"""Factor by which ``eps`` falls from one phase to the next."""

FINAL_EPS = 1e-10
"""The last phase's ``eps``, times ``n`` over the cost's span: the tight edges left to the
certificate are then those within a ten-billionth of the span of the assignment's own."""

BLOCK = 1 << 25
"""Entries of the cost handled in one block on a GPU (256 MiB of float64): bounds the working
memory, in few kernel launches."""

CPU_BLOCK = 1 << 20
"""The same on the CPU (8 MiB), where blocks that stay in cache are faster: 3.5-3.8 s against
5.5 s at 4096 rows (low-rank costs, 2 cores), the process's peak 640 MB against 865 MB."""

TIGHT_PER_ROW = 4
"""The phases stop early once the tight edges are at most this many per row: their sparse
problem is then solved exactly on the CPU in milliseconds, in place of the last phases."""

SPARSE_MAX = 1 << 22
"""Most tight edges the certificate solves exactly on the CPU at the last phase; past it the
whole cost is solved there (far from reached: at ``FINAL_EPS`` the tight edges are about
``1.4 n`` on Gaussian costs, each bidder's second best column being tight)."""


def auction_assignment(cost: torch.Tensor, stats: dict[str, int] | None = None) -> torch.Tensor:
    """``p`` (int64, on the cost's device) maximizing ``sum_i cost[i, p[i]]`` over permutations,
    exactly (the same optimum as LAPJV on the same float64 values). ``cost``: square, finite,
    float, on any device. ``stats``, when given, receives the phases, bidding rounds and tight
    edges."""
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be square, got shape {tuple(cost.shape)}")
    n = cost.shape[0]
    dev = cost.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    a = cost.to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("cost matrix holds NaN or Inf")
    best = a.argmax(dim=1)
    if int(torch.bincount(best, minlength=n).max()) == 1:  # every row's best column differs
        return best
    span = float(a.max() - a.min())
    if span == 0:  # every assignment sums the same
        return torch.arange(n, device=dev)
    if not 1e-150 < span < 1e150:  # keep every eps a normal float
        a, span = a / span, 1.0
    prices = torch.zeros(n, dtype=torch.float64, device=dev)
    row_col = torch.full((n,), -1, dtype=torch.int64, device=dev)
    col_row = torch.full((n,), -1, dtype=torch.int64, device=dev)
    final = span * FINAL_EPS / n
    eps = span / SCALE
    rounds = phases = 0
    while True:
        rounds += _bid(a, prices, row_col, col_row, eps)
        phases += 1
        if eps <= final:
            tight = _tight(a, prices, row_col, eps, SPARSE_MAX)
            break
        if eps <= span / n:  # the tight edges thin out from here: stop once they are few
            tight = _tight(a, prices, row_col, eps, TIGHT_PER_ROW * n)
            if tight is not None:
                break
        eps = max(eps / SCALE, final)
        # rows whose column is no longer within the smaller eps of their best bid again
        slack = _best_profit(a, prices) - (a.gather(1, row_col[:, None]).squeeze(1) - prices[row_col])
        drop = (slack > eps).nonzero().squeeze(1)
        col_row[row_col[drop]] = -1
        row_col[drop] = -1
    if stats is not None:
        stats.update(phases=phases, rounds=rounds, tight=-1 if tight is None else len(tight[0]))
    if tight is None:  # more tight edges than a sparse solve takes (not met in practice)
        _, cols = linear_sum_assignment(a.cpu().numpy(), maximize=True)
        return torch.as_tensor(cols, dtype=torch.int64, device=dev)
    return _certified(n, row_col, tight)


def solve_on_device(cost: np.ndarray, device: str | torch.device | None = None) -> np.ndarray:
    """:func:`auction_assignment` of a numpy cost on ``device`` when it is a CUDA device (None:
    the current one when there is one), else on the CPU (MPS has no float64), as int64 numpy."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        dev = torch.device("cpu")
    return auction_assignment(torch.from_numpy(np.ascontiguousarray(cost)).to(dev)).cpu().numpy()


def _rows_per_block(a: torch.Tensor) -> int:
    return max(1, (BLOCK if a.is_cuda else CPU_BLOCK) // a.shape[1])


def _best_profit(a: torch.Tensor, prices: torch.Tensor) -> torch.Tensor:
    """Each row's best ``C[i, j] - price[j]``, in blocks of rows."""
    n = a.shape[0]
    step = _rows_per_block(a)
    return torch.cat([(a[i : i + step] - prices).amax(dim=1) for i in range(0, n, step)])


def _bid(
    a: torch.Tensor, prices: torch.Tensor, row_col: torch.Tensor, col_row: torch.Tensor, eps: float
) -> int:
    """Bid until every row holds a column (one phase at ``eps``; updates the tensors in place);
    return the rounds of bids."""
    n = a.shape[0]
    step = _rows_per_block(a)
    lowest = torch.tensor(-torch.inf, dtype=torch.float64, device=a.device)
    rounds = 0
    while True:
        free = (row_col < 0).nonzero().squeeze(1)
        if not free.numel():
            return rounds
        rounds += 1
        cols, bids = [], []
        for i in range(0, free.numel(), step):
            rows = free[i : i + step]
            vals = a.index_select(0, rows) - prices
            first, col = vals.max(dim=1)
            if n > 1:
                vals.scatter_(1, col[:, None], lowest.expand(len(rows), 1))
                second = vals.amax(dim=1)
            else:
                second = first - eps
            cols.append(col)
            bids.append(prices[col] + (first - second) + eps)
        col, bid = torch.cat(cols), torch.cat(bids)
        top = torch.full((n,), -torch.inf, dtype=torch.float64, device=a.device)
        top.scatter_reduce_(0, col, bid, reduce="amax")
        won = bid == top[col]
        winner = torch.full((n,), n, dtype=torch.int64, device=a.device)
        winner.scatter_reduce_(0, col[won], free[won], reduce="amin")  # ties: the lowest row
        taken = (winner < n).nonzero().squeeze(1)
        before = col_row[taken]
        row_col[before[before >= 0]] = -1
        rows = winner[taken]
        col_row[taken] = rows
        row_col[rows] = taken
        prices[taken] = top[taken]


def _tight(
    a: torch.Tensor, prices: torch.Tensor, row_col: torch.Tensor, eps: float, most: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The edges whose slack is within ``n * eps`` (rows, columns, slacks), or None past
    ``most`` of them."""
    n = a.shape[0]
    own = a.gather(1, row_col[:, None]).squeeze(1) - prices[row_col]
    # the slacks' rounding: a few ulps of the largest magnitudes summed
    tol = 64 * torch.finfo(torch.float64).eps * float(a.abs().max() + prices.abs().max() + own.abs().max())
    bound = n * eps + tol
    step = _rows_per_block(a)
    rows, cols, slacks = [], [], []
    count = 0
    for i in range(0, n, step):
        slack = own[i : i + step, None] + prices - a[i : i + step]
        at = (slack <= bound).nonzero()
        count += len(at)
        if count > most:
            return None
        rows.append(at[:, 0] + i)
        cols.append(at[:, 1])
        # shifted positive (a sparse matrix drops zeros): the same optimum
        slacks.append(slack[at[:, 0], at[:, 1]] + 2 * bound)
    return torch.cat(rows), torch.cat(cols), torch.cat(slacks)


def _certified(
    n: int, row_col: torch.Tensor, tight: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The optimum, from the tight edges of an assignment within ``n * eps`` of it (see the
    module's docstring): the assignment itself when they are its own, else theirs solved
    exactly (minimizing the slacks: they differ from ``-C`` by a constant per row and column)."""
    rows, cols, slacks = tight
    if len(rows) == n:
        return row_col
    graph = csr_matrix((slacks.cpu().numpy(), (rows.cpu().numpy(), cols.cpu().numpy())), shape=(n, n))
    _, best = min_weight_full_bipartite_matching(graph)
    return torch.as_tensor(np.asarray(best, dtype=np.int64), device=row_col.device)
