"""Interpolate state dicts: ``(1 - alpha) A + alpha B``, and weighted averages of many."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import torch

from rebasin.checkpoint import LazyStateDict, StateDict
from rebasin.checkpoint.state import info_of
from rebasin.core.types import Permutation
from rebasin.matching.costs import param_dot
from rebasin.permutation import permute_tensor
from rebasin.spec.core import PermutationSpec


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

    return LazyStateDict(list(a), get, info_of(a))


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

    return LazyStateDict(list(first), get, info_of(first))


class LastRead(Mapping[str, torch.Tensor]):
    """A view of a state dict that remembers the last tensor read: when one pass reads a tensor
    twice (to merge it and to measure a distance), the file is read once and only one tensor
    is held."""

    def __init__(self, state: StateDict):
        self.state = state
        self.info = info_of(state)
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is None or self._last[0] != key:
            self._last = None  # drop the previous tensor before reading the next
            self._last = (key, self.state[key])
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


class Distances:
    """``||A - B||`` and ``||A - pi(B)||``, gathered while pi(B) is produced tensor by tensor
    (each B tensor is read once for both); :meth:`result` reads what was never produced."""

    def __init__(
        self,
        a: Mapping[str, torch.Tensor],
        b: StateDict,
        spec: PermutationSpec,
        perm: Permutation,
        observe: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
        dots: Collection[str] = (),
    ):
        """``observe(name, a, b, pi_b)``, when given, sees every floating-point tensor the pass
        reads (``merge --diagnose`` gathers its figures there). The pass also takes
        ``<A, pi(B)>`` of the parameters named in ``dots`` (:attr:`dots`: the exact objective
        weight matching left to it, :attr:`MatchResult.unsettled`)."""
        self.a, self.b, self.spec, self.perm, self.observe = a, b, spec, perm, observe
        self._before: dict[str, float] = {}
        self._after: dict[str, float] = {}
        self._want = set(dots)
        self.dots: dict[str, float] = {}
        self._scratch: dict[str, torch.Tensor] = {}

    def aligned(self) -> StateDict:
        """pi(B), lazily, measuring both distances of every floating-point tensor it produces."""
        return LazyStateDict(list(self.b), self._get, info_of(self.b))

    def _get(self, key: str) -> torch.Tensor:
        tb = self.b[key]
        entries = self.spec.axes_to_perm.get(key)
        pib = permute_tensor(tb, entries, self.perm) if entries else tb
        if tb.is_floating_point() and key not in self._after:
            ta = self.a[key]
            self._before[key] = _squared_distance(ta, tb)
            self._after[key] = _squared_distance(ta, pib)
            if key in self._want:
                self.dots[key] = param_dot(ta, pib, self._scratch)
            if self.observe is not None:
                self.observe(key, ta, tb, pib)
        return pib

    def result(self) -> dict[str, float]:
        """``{"l2_before": ..., "l2_after": ...}`` over every floating-point tensor (and every
        dot of :attr:`dots` taken)."""
        for k in self.b:
            if k not in self._after:
                self._get(k)
        return {
            "l2_before": math.sqrt(sum(self._before.values())),
            "l2_after": math.sqrt(sum(self._after.values())),
        }


_CHUNK = 1 << 20


def _squared_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """``sum((x - y)^2)`` in float64, a block at a time (bounded memory)."""
    x, y = x.reshape(-1), y.reshape(-1).to(x.device)
    # two 2-byte floats differ in float32 with no rounding unless 16 binades apart; the squares
    # are summed in float64 either way
    wide = torch.float32 if x.element_size() == 2 and y.element_size() == 2 else torch.float64
    total = 0.0
    for i in range(0, x.numel(), _CHUNK):
        d = x[i : i + _CHUNK].to(wide) - y[i : i + _CHUNK].to(wide)
        total += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    return total
