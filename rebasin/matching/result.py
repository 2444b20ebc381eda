"""What every matcher returns: a permutation with its diagnostics (frozen)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from rebasin.core.types import Permutation


def float32_state(
    state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a state dict as float32 on ``device`` (integer buffers dropped)."""
    return {k: state[k].to(device, torch.float32) for k in state if state[k].is_floating_point()}


@dataclass(frozen=True)
class GroupStats:
    """One group's share of the objective at the identity and at the found permutation
    (other groups held at the found permutation), and the fraction of units that moved."""

    size: int
    objective_before: float
    objective_after: float
    moved_fraction: float


@dataclass(frozen=True)
class RestartTrace:
    """One run of coordinate descent."""

    seed: list[int]
    init: str
    objective: float
    sweeps: int
    converged: bool
    objective_per_sweep: list[float]
    seconds_per_sweep: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class MatchResult:
    """A found permutation of B (``p[i]`` = unit of B placed at position i) and its diagnostics.

    ``objective`` is what the method optimizes, named by ``objective_name``; ``maximize`` says
    which way is better. ``objective_identity`` is its value with B as it is. ``history`` holds
    its values as the run went on (sweeps, steps or evaluations). ``converged`` is None for
    methods where convergence means nothing (a fixed number of steps, a single exact solve)."""

    perm: Permutation
    objective_identity: float
    objective: float
    groups: dict[str, GroupStats]
    objective_name: str = ""
    maximize: bool = True
    history: list[float] = field(default_factory=list)
    converged: bool | None = None
    restarts: list[RestartTrace] = field(default_factory=list)
    best_restart: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    method: str = ""
    """The method's registered name (set by :meth:`rebasin.matching.registry.Matcher.match`)."""
    stopped: str | None = None
    """Why the search ended before converging (a time budget), or None."""
    profile: dict[str, float | int] = field(default_factory=dict)
    """Where the time and the reads went (weight matching: seconds of products, assignments and
    the exact objective; bytes read; multiply-adds computed, updated and saved)."""
    unsettled: tuple[str, ...] = ()
    """Weight matching asked to leave its final exact objective to the caller's pass over pi(B)
    (``settle_later``): the parameters whose ``<A, pi(B)>`` that pass takes (with
    :func:`rebasin.matching.costs.param_dot`) for :meth:`settle`. Until then ``objective`` and
    the last ``history`` entries are the float32 products' estimate. Empty: settled."""

    def settle(self, dots: Mapping[str, float]) -> MatchResult:
        """The result with its exact objective: ``dots`` (``<A, pi(B)>`` of each parameter in
        :attr:`unsettled`) summed in order, as the matching would have summed them."""
        if not self.unsettled:
            return self
        value = 0.0
        for p in self.unsettled:
            value += dots[p]
        history = capped(self.history, value)
        traces = list(self.restarts)
        if traces:
            t = traces[self.best_restart]
            per_sweep = capped(t.objective_per_sweep, value)
            traces[self.best_restart] = dataclasses.replace(t, objective=value, objective_per_sweep=per_sweep)
        return dataclasses.replace(self, objective=value, history=history, restarts=traces, unsettled=())

    def improved(self) -> bool:
        """Whether the found permutation is at least as good as B as it is, on the method's own
        criterion (tiny float differences aside)."""
        tol = 1e-9 * max(1.0, abs(self.objective_identity))
        if self.maximize:
            return self.objective >= self.objective_identity - tol
        return self.objective <= self.objective_identity + tol

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready diagnostics (the permutation itself is omitted)."""
        return {
            "method": self.method,
            "options": self.options,
            "objective_name": self.objective_name,
            "direction": "max" if self.maximize else "min",
            "objective_identity": self.objective_identity,
            "objective": self.objective,
            "history": self.history,
            "converged": self.converged,
            "best_restart": self.best_restart,
            "seconds": round(self.seconds, 4),
            "stopped": self.stopped,
            "profile": self.profile,
            "restarts": [r.__dict__ for r in self.restarts],
            "groups": {g: s.__dict__ for g, s in self.groups.items()},
        }


def capped(history: list[float], value: float) -> list[float]:
    """A descent's objective per sweep ending at its exact ``value``: the estimates before it
    are capped at it (each is within the products' rounding of its sweep's exact value, and the
    exact values never fall)."""
    out = [*history[:-1], value]
    for i in range(len(out) - 2, -1, -1):
        if out[i] <= value:
            break
        out[i] = value
    return out


def no_worse(
    perm: Permutation, value: float, identity: Permutation, at_identity: float
) -> tuple[Permutation, float, bool]:
    """The rule every method that minimizes its own criterion keeps: never end worse than B as
    it is. Returns the permutation kept, its value, and whether that is the identity."""
    if at_identity < value:
        return identity, at_identity, True
    return perm, value, False
