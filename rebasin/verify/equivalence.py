"""Verify a permutation: pi(B) must compute what B computes.

Both are run on a probe batch in float32 eval mode and their outputs compared. Where the model's
output axis is itself a permuted axis (a headless model whose output is the residual stream), the
outputs are compared up to that group's permutation, and the result says which group it is. When
the check fails, the groups are applied one at a time to name the first one that breaks it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rebasin.checkpoint import Checkpoint, LazyStateDict
from rebasin.checkpoint.state import info_of
from rebasin.core.errors import CheckpointError, ConfigError
from rebasin.core.types import Permutation
from rebasin.models.fit import load_into
from rebasin.permutation import permute
from rebasin.spec.core import PermutationSpec

RELATIVE_TOL = 1e-4
"""Largest |difference| / max |output| accepted: float32 sums in another order differ by ~1e-6."""


@dataclass(frozen=True)
class Equivalence:
    """The outcome of one check: the largest absolute and relative output difference, the probe,
    and the group the output axis follows (None when the outputs are equal as they are)."""

    ok: bool
    max_abs_diff: float
    relative: float
    probe: str
    output_group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "max_abs_diff": self.max_abs_diff,
            "relative": self.relative,
            "probe": self.probe,
            "output_group": self.output_group,
        }


def first_tensor(out: Any) -> torch.Tensor:
    """The main output of a model: a tensor, a Hugging Face output's logits or last hidden state,
    or the first tensor of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state", "pooler_output"):
        v = getattr(out, name, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot read the model's output ({type(out).__name__})")


class Verifier:
    """Runs states through fresh models built by ``make_model`` on ``inputs``."""

    def __init__(
        self, make_model: Callable[[], nn.Module], inputs: Sequence[torch.Tensor], probe: str, name: str
    ):
        self.make_model, self.inputs, self.probe, self.name = make_model, tuple(inputs), probe, name
        self._model: nn.Module | None = None
        self._before: list[tuple[Mapping[str, torch.Tensor], torch.Tensor]] = []
        self.scope: Callable[[str], bool] | None = None
        """Which tensors the built model holds (a model cut to its first layer), or None: all."""

    @torch.no_grad()
    def output(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's float32 eval-mode output for ``state`` on the probe."""
        model = self.model()
        load_into(model, state, "verification", self.name)
        return first_tensor(model(*self.inputs)).float()

    def model(self) -> nn.Module:
        """The float32 eval-mode model the checks run (built once)."""
        if self._model is None:
            self._model = self.make_model().float().eval()
        return self._model

    def model_bytes(self) -> int:
        """The memory the model's parameters take once loaded."""
        return 4 * sum(p.numel() for p in self.model().parameters())

    def compare(
        self, before: torch.Tensor, after: torch.Tensor, perm: Permutation | None = None
    ) -> Equivalence:
        """Equal outputs, or equal up to the permutation of one group along the output axis."""
        result = _diff(before, after, self.probe)
        if result.ok or perm is None:
            return result
        for g, p in sorted(perm.items()):
            if before.shape[-1] == len(p) and not torch.equal(p, torch.arange(len(p))):
                moved = _diff(before[..., p.to(before.device)], after, self.probe)
                if moved.ok:
                    return Equivalence(True, moved.max_abs_diff, moved.relative, self.probe, g)
        return result

    def prepare(self, state: Mapping[str, torch.Tensor], spec: PermutationSpec) -> None:
        """Run ``state`` itself ahead of time, before its permutation is known; ``check`` and
        ``first_breaking_group`` on the same ``state`` then run only the permuted model."""
        scoped, _, _ = self._scoped(state, spec, {})
        self._before.append((state, self.output(scoped)))

    def reference(self, state: Mapping[str, torch.Tensor], spec: PermutationSpec) -> torch.Tensor:
        """The output of ``state`` itself (run once)."""
        for known, out in self._before:
            if known is state:
                return out
        self.prepare(state, spec)
        return self._before[-1][1]

    def check(
        self, state: Mapping[str, torch.Tensor], spec: PermutationSpec, perm: Permutation
    ) -> Equivalence:
        """Does ``permute(state, perm)`` compute what ``state`` computes?"""
        before = self.reference(state, spec)
        state, spec, perm = self._scoped(state, spec, perm)
        return self.compare(before, self.output(permute(state, spec, perm)), perm)

    def first_breaking_group(
        self, state: Mapping[str, torch.Tensor], spec: PermutationSpec, perm: Permutation
    ) -> str | None:
        """Apply the groups one at a time (tied groups together): the first that breaks it."""
        before = self.reference(state, spec)
        state, spec, perm = self._scoped(state, spec, perm)
        for unit in spec.units:
            part = {g: perm[g] for g in unit if g in perm}
            if part and not self.compare(before, self.output(permute(state, spec, part)), part).ok:
                return sorted(unit)[0]
        return None

    def _scoped(
        self, state: Mapping[str, torch.Tensor], spec: PermutationSpec, perm: Permutation
    ) -> tuple[Mapping[str, torch.Tensor], PermutationSpec, Permutation]:
        if self.scope is None:
            return state, spec, perm
        names = [k for k in state if self.scope(k)]
        spec = spec.restricted(names)
        perm = {g: p for g, p in perm.items() if g in spec.sizes}
        return LazyStateDict(names, state.__getitem__, info_of(state)), spec, perm


def _diff(before: torch.Tensor, after: torch.Tensor, probe: str) -> Equivalence:
    if before.shape != after.shape:
        return Equivalence(False, float("inf"), float("inf"), probe)
    d = (before - after).abs()
    max_abs = float(d.max()) if d.numel() else 0.0
    scale = float(before.abs().max()) if before.numel() else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    ok = bool(torch.isfinite(d).all()) and rel <= RELATIVE_TOL
    return Equivalence(ok, max_abs, rel, probe)


NOT_VERIFIED: dict[str, Any] = {"ok": None}


def verify(
    verifier: Verifier | None,
    why_not: str,
    ck: Checkpoint,
    spec: PermutationSpec,
    perm: Permutation,
    what: str = "pi(B)",
    of: str = "B",
) -> dict[str, Any]:
    """Check that ``perm`` preserves ``ck``'s function; the report's ``equivalence`` section.
    Raises CheckpointError naming the first group that breaks it."""
    if verifier is None:
        return {**NOT_VERIFIED, "reason": why_not}
    try:
        eq = verifier.check(ck.state, spec, perm)
    except ConfigError as e:  # a model that can be built must fit, as its own library loads it
        hint = f"{e.hint}; or pass --no-verify to write it unverified" if e.hint else "pass --no-verify"
        raise ConfigError(e.message, hint, source=e.source) from None
    if not eq.ok:
        group = verifier.first_breaking_group(ck.state, spec, perm)
        where = f"; the first group that breaks it: '{group}'" if group else ""
        raise CheckpointError(
            f"{what} does not compute what {of} computes (max abs diff {eq.max_abs_diff:.3g}, "
            f"relative {eq.relative:.2g} on {eq.probe}){where}",
            f"check the spec (rebasin spec), freeze the group (--freeze {group or 'GROUP'}), "
            "or pass --no-verify to write it anyway",
            source=ck.name,
        )
    return eq.to_dict()
