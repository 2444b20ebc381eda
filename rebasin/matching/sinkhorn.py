"""Sinkhorn re-basin (Pena, Medeiros, Dubois, Bengio, Trassard, "Re-basin via implicit Sinkhorn
differentiation", CVPR 2023).

Each group gets a real n x n matrix W; its soft permutation is the Sinkhorn projection of W / tau
(log domain, to convergence) onto the doubly-stochastic matrices. A cost of the softly permuted B
is minimized by Adam while tau anneals geometrically; gradients flow through the Sinkhorn fixed
point by implicit differentiation (no unrolled iterations). The hard permutation is the linear
assignment maximizing W. Costs: ``l2`` (distance between A and the permuted B, data-free),
``mid`` (task loss of the midpoint model) and ``rnd`` (task loss at a random lambda), the last two
through a ``task_loss`` callable supplied by the caller.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rebasin.errors import ConfigError
from rebasin.matching.assignment import resolve_backend, solve_groups
from rebasin.matching.result import GroupStats, MatchResult, Permutation, Progress, float32_state, no_worse
from rebasin.spec.core import Axis, parts

if TYPE_CHECKING:
    from rebasin.matching.methods import SinkhornRebasin
    from rebasin.matching.registry import DataSide, MatchProblem

TaskLoss = Callable[[dict[str, torch.Tensor], int], torch.Tensor]
"""task_loss(params, step) -> scalar loss of a model with these parameters on the step's batch."""


def sinkhorn(
    s: torch.Tensor, iters: int = 200, tol: float = 1e-9, duals: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Doubly-stochastic ``exp(s + alpha_i + beta_j)`` by log-domain Sinkhorn iterations on the
    dual potentials. ``duals`` (a list ``[alpha, beta]``, updated in place) warm-starts from a
    previous, similar ``s``: during optimization a few iterations then suffice."""
    n = s.shape[0]
    if duals and duals[0].shape == (n,) and duals[0].dtype == s.dtype:
        alpha, beta = duals
    else:
        alpha = torch.zeros(n, dtype=s.dtype, device=s.device)
        beta = -torch.logsumexp(s, dim=0)
    for i in range(iters):
        alpha = -torch.logsumexp(s + beta[None, :], dim=1)
        beta = -torch.logsumexp(s + alpha[:, None], dim=0)
        if i % 5 == 4:
            rows = torch.exp(s + alpha[:, None] + beta[None, :]).sum(1)
            if float((rows - 1).abs().max()) < tol:
                break
    if duals is not None:
        duals[:] = [alpha, beta]
    return torch.exp(s + alpha[:, None] + beta[None, :])


class ImplicitSinkhorn(torch.autograd.Function):
    """Sinkhorn projection whose backward pass differentiates the fixed point implicitly.

    With P = exp(S + alpha 1^T + 1 beta^T) doubly stochastic and G = dL/dP, the gradient is
    dL/dS = P * (G - lambda 1^T - 1 mu^T), where (lambda, mu) solve [[I, P], [P^T, I]] (lambda, mu)
    = (rowsum(G*P), colsum(G*P)). The system is singular along (1, -1); fixing mu_n = 0 removes it.
    """

    @staticmethod
    def forward(
        ctx: Any, s: torch.Tensor, iters: int, tol: float = 1e-9, duals: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            p = sinkhorn(s.detach(), iters, tol, duals)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (p,) = ctx.saved_tensors
        pd, gd = p.double(), grad.double()
        gp = gd * pd
        h1, h2 = gp.sum(1), gp.sum(0)
        n = pd.shape[0]
        # lambda = h1 - P mu;  (I - P^T P) mu = h2 - P^T h1, with mu_n = 0
        m = torch.eye(n, dtype=torch.float64, device=pd.device) - pd.T @ pd
        rhs = h2 - pd.T @ h1
        mu = torch.zeros(n, dtype=torch.float64, device=pd.device)
        if n > 1:
            try:
                mu[:-1] = torch.linalg.solve(m[:-1, :-1], rhs[:-1])
            except RuntimeError:  # P (nearly) a hard permutation: pseudo-inverse, min-norm
                try:
                    mu = torch.linalg.pinv(m) @ rhs
                except RuntimeError:  # non-finite input: no usable gradient this step
                    return torch.zeros_like(grad), None, None, None
        lam = h1 - pd @ mu
        ds = pd * (gd - lam[:, None] - mu[None, :])
        # an ill-conditioned solve can overflow the input's dtype: keep the step usable (Adam rescales)
        ds = torch.nan_to_num(ds, nan=0.0, posinf=0.0, neginf=0.0).clamp(-1e6, 1e6)
        return ds.to(grad.dtype), None, None, None


def soft_permute(t: torch.Tensor, entries: tuple[Any, ...], soft: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Apply soft permutation matrices (rows: new positions) along every permuted axis of ``t``."""
    for axis, e in enumerate(entries):
        segs = [a for a in parts(e) if a.group in soft]
        if not segs:
            continue
        moved = t.movedim(axis, 0)
        pieces, end = [], 0
        for a in segs:
            p = soft[a.group]
            n = p.shape[1] * a.inner
            start = a.start if not isinstance(e, Axis) else 0
            pieces += [moved[end:start]] if start > end else []
            piece = moved[start : start + n]
            shape = piece.shape
            piece = piece.reshape(p.shape[1], a.inner, -1)
            pieces.append((torch.einsum("ij,jkl->ikl", p, piece)).reshape(shape))
            end = start + n
        pieces += [moved[end:]] if end < moved.shape[0] else []
        t = torch.cat(pieces).movedim(0, axis)
    return t


def sinkhorn_rebasin(
    opts: SinkhornRebasin, problem: MatchProblem, data: DataSide | None, progress: Progress | None = None
) -> MatchResult:
    """Run Sinkhorn re-basin with the options ``opts`` (see :class:`SinkhornRebasin`). The data
    costs (``mid``, ``rnd``) need ``data``. The result never ends worse than B as it is on the
    method's criterion (distance for ``l2``, midpoint loss on training data otherwise): if the
    found permutation is worse, the identity is kept."""
    a, b, spec = problem.a, problem.b, problem.spec
    task_loss = data.task_loss() if data is not None else None
    if opts.cost != "l2" and task_loss is None:
        raise ConfigError(f"Sinkhorn cost '{opts.cost}' needs data: pass --data (and a model, --model)")
    steps = opts.steps
    if opts.epochs is not None and data is not None:
        steps = opts.epochs * data.batches_per_epoch()
    backend = resolve_backend(opts.backend)
    t0 = time.perf_counter()
    dev = torch.device(problem.device)
    gen = torch.Generator().manual_seed(problem.seed)
    fa, fb = float32_state(a, dev), float32_state(b, dev)
    logits = {}
    for g, n in sorted(spec.sizes.items()):
        w = torch.eye(n) * (1.0 if opts.init == "identity" else 0.0) + 0.01 * torch.randn(n, n, generator=gen)
        logits[g] = w.to(dev).requires_grad_(True)
    opt = torch.optim.Adam(list(logits.values()), lr=opts.lr)
    duals: dict[str, list[torch.Tensor]] = {g: [] for g in logits}
    scale = sum(float((fa[k] ** 2).sum()) for k in spec.params) or 1.0
    history = []
    ratio = (opts.tau_end / opts.tau_start) ** (1 / max(1, steps - 1))
    for step in range(steps):
        tau = opts.tau_start * ratio**step
        soft = {
            g: ImplicitSinkhorn.apply(w / tau, opts.sinkhorn_iters, 1e-4, duals[g]) for g, w in logits.items()
        }
        pb = {
            k: soft_permute(fb[k], spec.axes_to_perm[k], soft) if k in spec.axes_to_perm else fb[k]
            for k in fb
        }
        if opts.cost == "l2":
            loss = sum(((fa[k] - pb[k]) ** 2).sum() for k in spec.params) / scale
        else:
            assert task_loss is not None
            lam = 0.5 if opts.cost == "mid" else float(torch.rand((), generator=gen))
            params = {k: (1 - lam) * fa[k] + lam * pb[k] for k in fb}
            loss = task_loss(params, step)
        opt.zero_grad()
        if not bool(torch.isfinite(loss.detach())):  # type: ignore[union-attr]
            continue  # a diverging batch: skip it rather than poison the logits
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        history.append(float(loss.detach()))  # type: ignore[union-attr]
        if progress and (step % 10 == 0 or step == steps - 1):
            progress(f"sinkhorn ({opts.cost})", step + 1, steps)
    perm, groups = {}, {}
    costs = {g: w.detach().double().cpu().numpy() for g, w in logits.items()}
    solved = solve_groups(costs, spec, backend)
    for g, c in costs.items():
        p = solved[g]
        perm[g] = torch.from_numpy(p)
        n = spec.sizes[g]
        groups[g] = GroupStats(
            n, float(np.trace(c)), float(c[np.arange(n), p].sum()), float((p != np.arange(n)).mean())
        )
    from rebasin.permutation import identity, permute

    if opts.cost == "l2":
        name = "||A - pi(B)||"

        def criterion(p: Permutation) -> float:
            hard = permute({k: fb[k] for k in spec.params}, spec, p)
            return math.sqrt(sum(float(((fa[k] - hard[k]) ** 2).sum()) for k in spec.params))

    else:
        assert data is not None
        name, score = "midpoint loss (training data)", data.score()

        def criterion(p: Permutation) -> float:
            pb = permute(fb, spec, p)
            return score({k: 0.5 * (fa[k] + pb[k]) for k in fb})

    ident = identity(spec)
    at_identity, found = criterion(ident), criterion(perm)
    perm, found, kept_identity = no_worse(perm, found, ident, at_identity)
    return MatchResult(
        method="sinkhorn",
        perm=perm,
        objective_identity=at_identity,
        objective=found,
        groups=groups,
        objective_name=name,
        maximize=False,
        history=history,
        converged=None,
        options={
            "cost": opts.cost,
            "steps": steps,
            "lr": opts.lr,
            "tau_start": opts.tau_start,
            "tau_end": opts.tau_end,
            "seed": problem.seed,
            "backend": backend,
            "loss_first": history[0] if history else None,
            "loss_last": history[-1] if history else None,
            "kept_identity": kept_identity,
        },
        seconds=time.perf_counter() - t0,
    )
