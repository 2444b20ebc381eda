"""Interpolate state dicts: ``(1 - alpha) A + alpha B``, and weighted averages of many."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from rebasin.checkpoint import LazyStateDict, StateDict


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpolate(a: StateDict, b: Mapping[str, torch.Tensor], alpha: float = 0.5) -> StateDict:
    """Lazily interpolate every floating-point tensor; others (e.g. BatchNorm's
    ``num_batches_tracked``) are copied from ``a``. Arithmetic runs in float32 (float64 for float64
    tensors) and each result keeps ``a``'s dtype."""

    def get(key: str) -> torch.Tensor:
        ta = a[key]
        if not ta.is_floating_point():
            return ta
        w = _work_dtype(ta.dtype)
        tb = b[key].to(device=ta.device, dtype=w)
        return torch.lerp(ta.to(w), tb, float(alpha)).to(ta.dtype)

    return LazyStateDict(list(a), get, getattr(a, "shapes", None))


def average(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """Lazily compute the weighted average of N state dicts (weights default to uniform)."""
    if not states:
        raise ValueError("nothing to average")
    ws = list(weights) if weights is not None else [1.0 / len(states)] * len(states)
    if len(ws) != len(states):
        raise ValueError("one weight per state dict")
    total = sum(ws)
    ws = [w / total for w in ws]
    first = states[0]

    def get(key: str) -> torch.Tensor:
        t0 = first[key]
        if not t0.is_floating_point():
            return t0
        w = _work_dtype(t0.dtype)
        acc = torch.zeros(t0.shape, dtype=w, device=t0.device)
        for s, wt in zip(states, ws, strict=True):
            acc += wt * s[key].to(device=t0.device, dtype=w)
        return acc.to(t0.dtype)

    return LazyStateDict(list(first), get, getattr(first, "shapes", None))
