"""Soft permutations: the Sinkhorn projection onto doubly-stochastic matrices, its implicit
gradient, and applying soft permutation matrices to tensors.

Everything works on one matrix ``(n, n)`` or a stack of them ``(G, n, n)`` (the groups of one
size, projected together: one set of small operations for all of them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from rebasin.spec.core import Axis, parts

CHECK_EVERY = 4
"""Sinkhorn iterations between convergence and range checks (each check synchronizes)."""


@contextmanager
def no_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero while the block runs (where the CPU supports it), then
    restore the setting. At low temperature most of a Sinkhorn kernel's entries are subnormal,
    and arithmetic on them is an order of magnitude slower on x86 CPUs: flushing them changes
    values below 1e-38 only, far under the projection's tolerance."""
    was_on = float(torch.full((), 1e-40) * 1.0) == 0.0  # torch has no getter: probe it
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was_on:
            torch.set_flush_denormal(False)


def _vm(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Batched vector-matrix product ``x^T m`` (``x`` (..., n), ``m`` (..., n, n)). A product with
    ``m^T`` is taken as one with a contiguous transposed copy: batched matrix-vector products
    are several times slower than vector-matrix ones on the CPU."""
    return (x.unsqueeze(-2) @ m).squeeze(-2)


def _t(m: torch.Tensor) -> torch.Tensor:
    return m.transpose(-1, -2).contiguous()


def sinkhorn(
    s: torch.Tensor, iters: int = 200, tol: float = 1e-9, duals: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Doubly-stochastic ``exp(s + alpha_i + beta_j)`` for ``s`` of shape (..., n, n).

    The dual potentials (alpha, beta) live in the log domain; the iterations scale
    ``K = exp(s + alpha_i + beta_j)`` by vectors (u, v) with matrix-vector products, and fold the
    scalings into the potentials (one log-domain step) whenever they leave a safe range, so low
    temperatures neither overflow nor cost a log-sum-exp per iteration. ``duals`` (a list
    ``[alpha, beta]``, updated in place) warm-starts from a previous, similar ``s``: during
    optimization a few iterations then suffice. Stops when every row sum is within ``tol`` of 1
    (columns are exact after each iteration), or after ``iters`` iterations."""
    lead = s.shape[:-1]
    if duals and duals[0].shape == lead and duals[0].dtype == s.dtype:
        alpha, beta = duals
    else:
        alpha = -s.amax(-1)
        beta = -(s + alpha.unsqueeze(-1)).amax(-2)
    big = 1e100 if s.dtype == torch.float64 else 1e15

    def kernel(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return torch.exp(s + alpha.unsqueeze(-1) + beta.unsqueeze(-2))

    k = kernel(alpha, beta)
    kt = _t(k)
    u = torch.ones(lead, dtype=s.dtype, device=s.device)
    v = torch.ones_like(u)
    for i in range(iters):
        kv = _vm(v, kt)
        if i and i % CHECK_EVERY == 0:
            err = (u * kv - 1).abs().amax()
            if not bool(torch.isfinite(err)) or bool((u.amax() > big) | (v.amax() > big)):
                # out of range: one log-domain step from the potentials, then scale again
                alpha = -torch.logsumexp(s + beta.unsqueeze(-2), -1)
                beta = -torch.logsumexp(s + alpha.unsqueeze(-1), -2)
                k = kernel(alpha, beta)
                kt = _t(k)
                u, v = torch.ones_like(u), torch.ones_like(v)
                continue
            if float(err) < tol:
                break
        u = 1.0 / kv
        v = 1.0 / _vm(u, k)
    if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(v).all())):
        alpha = -torch.logsumexp(s + beta.unsqueeze(-2), -1)
        beta = -torch.logsumexp(s + alpha.unsqueeze(-1), -2)
        k = kernel(alpha, beta)
        u, v = torch.ones_like(u), torch.ones_like(v)
    if duals is not None:
        duals[:] = [alpha + torch.log(u), beta + torch.log(v)]
    return u.unsqueeze(-1) * k * v.unsqueeze(-2)


class ImplicitSinkhorn(torch.autograd.Function):
    """Sinkhorn projection whose backward pass differentiates the fixed point implicitly.

    With P = exp(S + alpha 1^T + 1 beta^T) doubly stochastic and G = dL/dP, the gradient is
    dL/dS = P * (G - lambda 1^T - 1 mu^T), where (lambda, mu) solve [[I, P], [P^T, I]] (lambda, mu)
    = (rowsum(G*P), colsum(G*P)). Eliminating lambda = h1 - P mu leaves (I - P^T P) mu =
    h2 - P^T h1: positive semi-definite, singular along 1 (to which the right-hand side is
    orthogonal), solved by conjugate gradients with matrix-vector products only.
    """

    @staticmethod
    def forward(
        ctx: Any, s: torch.Tensor, iters: int, tol: float = 1e-9, duals: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            p = sinkhorn(s.detach(), iters, tol, duals)
        ctx.save_for_backward(p)
        ctx.tol = tol
        return p

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (p,) = ctx.saved_tensors
        pd, gd = p, grad.to(p.dtype)
        gp = gd * pd
        h1, h2 = gp.sum(-1), gp.sum(-2)
        pt = _t(pd)
        mu = conjugate_gradient(pd, h2 - _vm(h1, pd), tol=ctx.tol, pt=pt)
        lam = h1 - _vm(mu, pt)
        ds = pd * (gd - lam.unsqueeze(-1) - mu.unsqueeze(-2))
        # a non-finite gradient (non-finite input) must not poison the optimizer's state
        ds = torch.nan_to_num(ds, nan=0.0, posinf=0.0, neginf=0.0)
        return ds.to(grad.dtype), None, None, None


def conjugate_gradient(
    p: torch.Tensor, rhs: torch.Tensor, iters: int = 1000, tol: float = 1e-10, pt: torch.Tensor | None = None
) -> torch.Tensor:
    """Solve ``(I - P^T P) x = rhs`` for each matrix of the stack by conjugate gradients, to a
    residual of ``tol`` relative to ``rhs`` (or ``iters`` iterations); ``pt`` is ``P^T``
    (contiguous), when the caller has it."""
    pt = _t(p) if pt is None else pt
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    d = r.clone()
    rs = (r * r).sum(-1)
    stop = (tol * tol) * rs
    for i in range(iters):
        if i % CHECK_EVERY == 0 and not bool((rs > stop).any()):
            break
        ad = d - _vm(_vm(d, pt), p)
        curv = (d * ad).sum(-1)
        active = (rs > stop) & (curv > 0)
        step = torch.where(active, rs / curv.clamp_min(1e-300), torch.zeros_like(rs))
        x = x + step.unsqueeze(-1) * d
        r = r - step.unsqueeze(-1) * ad
        rs_new = (r * r).sum(-1)
        d = r + torch.where(active, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs)).unsqueeze(-1) * d
        rs = torch.where(active, rs_new, torch.zeros_like(rs))
    return x


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
            piece = piece.reshape(p.shape[1], -1)
            pieces.append((p @ piece).reshape(shape))
            end = start + n
        pieces += [moved[end:]] if end < moved.shape[0] else []
        t = torch.cat(pieces).movedim(0, axis)
    return t
