"""PermutationSpec: which tensor axes are indexed by the same hidden units.

The spec is authored as ``axes_to_perm`` (parameter -> one entry per axis: a group or None); the
group view (group -> members) is derived from it, so the two can never disagree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from rebasin.errors import SpecError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Axis:
    """An axis permuted by ``group``. The axis has length ``size * inner`` and is viewed as
    ``(size, inner)``: the permutation moves contiguous blocks of ``inner`` elements (e.g. a dense
    layer after a flatten, whose inputs are channels x spatial positions)."""

    group: str
    inner: int = 1


class Member(NamedTuple):
    """One tensor axis belonging to a group."""

    param: str
    axis: int
    inner: int = 1


AxisEntry = Axis | None


class PermutationSpec:
    """Permutation groups over a state dict.

    Args:
        axes_to_perm: parameter name -> per-axis entries (group name, :class:`Axis`, or None).
        sizes: group name -> number of units it permutes.
        family: name of the architecture family the spec was made for (informational).
    """

    def __init__(
        self,
        axes_to_perm: Mapping[str, Sequence[str | Axis | None]],
        sizes: Mapping[str, int],
        family: str | None = None,
    ):
        self.axes_to_perm: dict[str, tuple[AxisEntry, ...]] = {}
        for p, entries in axes_to_perm.items():
            es = [Axis(e) if isinstance(e, str) else e for e in entries]
            while es and es[-1] is None:  # canonical: trailing fixed axes are implied
                es.pop()
            if es:
                self.axes_to_perm[p] = tuple(es)
        self.sizes: dict[str, int] = dict(sizes)
        self.family = family
        problems = self._structural_problems()
        if problems:
            raise SpecError(problems)

    # ------------------------------------------------------------------ derived views
    @cached_property
    def groups(self) -> dict[str, list[Member]]:
        """Group name -> members, in parameter order."""
        out: dict[str, list[Member]] = {g: [] for g in self.sizes}
        for p, entries in self.axes_to_perm.items():
            for axis, e in enumerate(entries):
                if e is not None:
                    out[e.group].append(Member(p, axis, e.inner))
        return out

    @cached_property
    def neighbours(self) -> dict[str, set[str]]:
        """Group -> the other groups that share a tensor with it."""
        out: dict[str, set[str]] = {g: set() for g in self.sizes}
        for entries in self.axes_to_perm.values():
            gs = {e.group for e in entries if e is not None}
            for g in gs:
                out[g] |= gs - {g}
        return out

    @property
    def params(self) -> list[str]:
        """Parameters touched by at least one group."""
        return list(self.axes_to_perm)

    def entry(self, param: str, axis: int) -> AxisEntry:
        """The group entry of one axis (None where the axis stays fixed)."""
        es = self.axes_to_perm.get(param, ())
        return es[axis] if axis < len(es) else None

    def fixed(self, names: Iterable[str]) -> list[str]:
        """The names (of a state dict) that no group touches."""
        touched = set(self.params)
        return [n for n in names if n not in touched]

    def digest(self) -> str:
        """Short SHA-256 of the canonical serialization."""
        text = json.dumps(self.to_dict(include_family=False), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"PermutationSpec({len(self.sizes)} groups, {len(self.params)} params)"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PermutationSpec)
            and self.axes_to_perm == other.axes_to_perm
            and self.sizes == other.sizes
        )

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ validation
    def _structural_problems(self) -> list[str]:
        problems = []
        for g, n in self.sizes.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                problems.append(f"group '{g}': size must be a positive integer, got {n!r}")
        used = set()
        for p, entries in self.axes_to_perm.items():
            for axis, e in enumerate(entries):
                if e is None:
                    continue
                used.add(e.group)
                if e.group not in self.sizes:
                    problems.append(f"'{p}' axis {axis}: group '{e.group}' has no size")
                if not isinstance(e.inner, int) or e.inner < 1:
                    problems.append(f"'{p}' axis {axis}: block size must be a positive integer")
        for g in self.sizes:
            if g not in used:
                problems.append(f"group '{g}' has no members")
        return problems

    def problems(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """Every disagreement between this spec and a state dict's shapes, one line each."""
        problems = []
        for p, entries in self.axes_to_perm.items():
            if p not in shapes:
                problems.append(f"tensor '{p}' named in the spec is not in the checkpoint")
                continue
            shape = tuple(shapes[p])
            if len(entries) > len(shape):
                problems.append(f"tensor '{p}' has {len(shape)} axes, the spec names axis {len(entries) - 1}")
                continue
            for axis, e in enumerate(entries):
                if e is None:
                    continue
                want = self.sizes.get(e.group, -1) * e.inner
                if shape[axis] != want:
                    extra = f" x block {e.inner}" if e.inner > 1 else ""
                    problems.append(
                        f"tensor '{p}' axis {axis} has length {shape[axis]}, group "
                        f"'{e.group}' has size {self.sizes.get(e.group)}{extra}"
                    )
        return problems

    def validate(self, shapes: Mapping[str, Sequence[int]], source: str | None = None) -> None:
        """Raise SpecError listing every problem of this spec against ``shapes``."""
        problems = self.problems(shapes)
        if problems:
            raise SpecError(problems, source=source)

    # ------------------------------------------------------------------ serialization
    def to_dict(self, include_family: bool = True) -> dict[str, Any]:
        """The file format (see docs/spec-format.md)."""
        groups: dict[str, Any] = {}
        for g, members in self.groups.items():
            groups[g] = {
                "size": self.sizes[g],
                "members": [
                    [m.param, m.axis] if m.inner == 1 else [m.param, m.axis, m.inner] for m in members
                ],
            }
        out: dict[str, Any] = {"format_version": FORMAT_VERSION}
        if include_family and self.family:
            out["family"] = self.family
        out["groups"] = groups
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> PermutationSpec:
        """Parse the file format strictly: unknown keys and malformed entries are errors."""
        problems: list[str] = []
        if not isinstance(data, dict):
            raise SpecError("a spec must be a mapping with 'format_version' and 'groups'", source=source)
        for k in data:
            if k not in ("format_version", "family", "groups", "fixed"):
                problems.append(f"unknown key '{k}' at top level")
        version = data.get("format_version")
        if version is None:
            problems.append("missing 'format_version'")
        elif version != FORMAT_VERSION:
            problems.append(f"unsupported format_version {version!r} (this rebasin reads 1)")
        groups = data.get("groups")
        axes: dict[str, list[Axis | None]] = {}
        sizes: dict[str, int] = {}
        claimed: dict[tuple[str, int], str] = {}
        if not isinstance(groups, dict) or not groups:
            problems.append("'groups' must be a non-empty mapping of group name to group")
            groups = {}
        for g, body in groups.items():
            if not isinstance(body, dict):
                problems.append(f"group '{g}': must be a mapping with 'size' and 'members'")
                continue
            for k in body:
                if k not in ("size", "members"):
                    problems.append(f"group '{g}': unknown key '{k}'")
            size = body.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                problems.append(f"group '{g}': 'size' must be a positive integer")
                size = 1
            sizes[str(g)] = size
            members = body.get("members")
            if not isinstance(members, list) or not members:
                problems.append(f"group '{g}': 'members' must be a non-empty list")
                continue
            for m in members:
                ok = (
                    isinstance(m, list | tuple)
                    and len(m) in (2, 3)
                    and isinstance(m[0], str)
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in m[1:])
                    and m[1] >= 0
                    and (len(m) == 2 or m[2] >= 1)
                )
                if not ok:
                    problems.append(
                        f"group '{g}': member {m!r} must be [tensor_name, axis] or "
                        "[tensor_name, axis, block_size]"
                    )
                    continue
                param, axis = m[0], m[1]
                inner = m[2] if len(m) == 3 else 1
                if (param, axis) in claimed:
                    problems.append(
                        f"'{param}' axis {axis} is claimed by both '{claimed[param, axis]}' and '{g}'"
                    )
                    continue
                claimed[param, axis] = str(g)
                entries = axes.setdefault(param, [])
                while len(entries) <= axis:
                    entries.append(None)
                entries[axis] = Axis(str(g), inner)
        if problems:
            raise SpecError(problems, "see docs/spec-format.md", source=source)
        family = data.get("family")
        return cls(axes, sizes, family=str(family) if family else None)


def load_spec(path: str | Path) -> PermutationSpec:
    """Read a spec from YAML or JSON (strict)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise SpecError("no such file", source=str(path))
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0]
        raise SpecError(f"cannot parse spec ({first})", source=str(path)) from None
    return PermutationSpec.from_dict(data, source=str(path))


def dump_spec(spec: PermutationSpec, fixed: Sequence[str] = (), as_json: bool = False) -> str:
    """Serialize a spec (YAML by default), listing ``fixed`` tensors for the reader."""
    import yaml

    data = spec.to_dict()
    if fixed:
        data["fixed"] = list(fixed)
    if as_json:
        return json.dumps(data, indent=2) + "\n"
    return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
