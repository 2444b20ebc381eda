"""How wide each group of a PLeaS merge becomes: ``--width`` for every group PLeaS widens,
``--group-width GROUP=W`` overrides (glob patterns), or ``--budget-params N`` (the widest uniform
width whose merged model has at most N parameters)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence

from rebasin.core.errors import ConfigError
from rebasin.spec.core import PermutationSpec

RESIDUAL = ("residual", "P_residual")
"""A transformer's residual stream group: it keeps A's width unless a ``--group-width`` names it."""


def fixed_groups(spec: PermutationSpec) -> dict[str, str]:
    """Groups that cannot change width, and why: attention heads (merged whole, as the head count
    in the model's config must stay) and groups with fused segments."""
    out = {g: "it is an attention head group (heads are merged whole)" for g in spec.heads}
    for p, entries in spec.axes_to_perm.items():
        for e in entries:
            if isinstance(e, tuple):
                for part in e:
                    out.setdefault(part.group, f"'{p}' fuses it with other groups on one axis")
    return out


def parse_group_widths(items: Sequence[str]) -> list[tuple[str, float]]:
    """``GROUP=W`` items -> (pattern, width); ConfigError on a malformed one."""
    out = []
    for item in items:
        pattern, sep, value = item.rpartition("=")
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not sep or not pattern or not 1.0 <= w <= 2.0:
            raise ConfigError(
                f"--group-width '{item}': expected GROUP=W with W from 1.0 to 2.0",
                "e.g. --group-width 'P_net.0=1.25'",
            )
        out.append((pattern, w))
    return out


def group_widths(
    spec: PermutationSpec,
    width: float,
    overrides: Sequence[tuple[str, float]] = (),
    budget: int | None = None,
    count: Callable[[Mapping[str, float]], int] | None = None,
) -> dict[str, float]:
    """Each group's merged width (as a multiple of its size). Every group PLeaS widens takes
    ``width`` (a transformer's residual stream and the fixed groups take 1.0), then the overrides
    apply in order; with ``budget``, the widest uniform width whose ``count(widths)`` of
    parameters stays within it (the overrides still apply)."""
    fixed = fixed_groups(spec)
    named: dict[str, float] = {}
    for pattern, w in overrides:
        hits = [g for g in spec.sizes if fnmatch.fnmatchcase(g, pattern)]
        if not hits:
            raise ConfigError(
                f"--group-width '{pattern}' names no group",
                f"groups: {', '.join(sorted(spec.sizes)[:8])}" + (" ..." if len(spec.sizes) > 8 else ""),
            )
        for g in hits:
            if w != 1.0 and g in fixed:
                raise ConfigError(f"--group-width: group '{g}' keeps its width: {fixed[g]}")
            named[g] = w
    free = [g for g in spec.sizes if g not in fixed and g not in named and g not in RESIDUAL]

    def widths(w: float) -> dict[str, float]:
        return {g: named.get(g, w if g in free else 1.0) for g in spec.sizes}

    if budget is None:
        return widths(width)
    assert count is not None
    if count(widths(1.0)) > budget:
        raise ConfigError(
            f"--budget-params {budget}: even with every group merged whole the model has "
            f"{count(widths(1.0))} parameters",
            "raise the budget, or lower the widths --group-width names",
        )
    lo, hi = 1.0, 2.0
    if count(widths(hi)) <= budget:
        return widths(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(widths(mid)) <= budget else (lo, mid)
    return widths(lo)
