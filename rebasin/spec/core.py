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

import yaml

from rebasin.core.errors import ConfigError, SpecError
from rebasin.core.textfiles import read_data

FORMAT_VERSION = 1

STATISTICS = ("running_mean", "running_var")
"""Names (last component) of the non-parameter state that normalization layers keep."""


def weighs_in_cost(name: str, buffers: Iterable[str] = ()) -> bool:
    """Whether tensor ``name`` counts in a data-free matching cost. Buffers (running statistics,
    and any name in ``buffers``) are permuted with their group but carry no weight: they are not
    what the network computes with its weights, and their scale (a running variance squared) can
    drown the weights' signal."""
    return name.rsplit(".", 1)[-1] not in STATISTICS and name not in set(buffers)


@dataclass(frozen=True)
class Axis:
    """An axis (or a segment of one) permuted by ``group``.

    The permuted stretch has length ``size * inner`` and is viewed as ``(size, inner)``: the
    permutation moves contiguous blocks of ``inner`` elements (e.g. a dense layer after a flatten,
    whose inputs are channels x spatial positions). ``start`` > 0, or several Axis objects on one
    axis (a tuple), describe a fused tensor: GPT-2's ``c_attn`` holds q | k | v along one axis, each
    segment permuted by its own group; elements outside every segment stay fixed."""

    group: str
    inner: int = 1
    start: int = 0


class Member(NamedTuple):
    """One tensor axis (or segment of it) belonging to a group."""

    param: str
    axis: int
    inner: int = 1
    start: int = 0
    segment: bool = False


@dataclass(frozen=True)
class Heads:
    """Block structure of a group: its ``size`` units form ``count`` equal heads, and a permutation
    may only move whole heads (and units within a head). Groups with the same ``tie`` move their
    heads together (attention: the q/k dims and v/o dims of one head)."""

    count: int
    tie: str | None = None


AxisEntry = Axis | tuple[Axis, ...] | None


def parts(entry: AxisEntry) -> tuple[Axis, ...]:
    """The Axis objects of one axis entry (none, one, or the segments of a fused axis)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, Axis) else entry


class PermutationSpec:
    """Permutation groups over a state dict.

    Args:
        axes_to_perm: parameter name -> per-axis entries (group name, :class:`Axis`, or None).
        sizes: group name -> number of units it permutes.
        family: name of the architecture family the spec was made for (informational).
    """

    def __init__(
        self,
        axes_to_perm: Mapping[str, Sequence[str | AxisEntry]],
        sizes: Mapping[str, int],
        family: str | None = None,
        heads: Mapping[str, Heads] | None = None,
        notes: Sequence[str] = (),
        output_group: str | None = None,
    ):
        self.axes_to_perm: dict[str, tuple[AxisEntry, ...]] = {}
        for p, entries in axes_to_perm.items():
            es = [_canonical(e) for e in entries]
            while es and es[-1] is None:  # canonical: trailing fixed axes are implied
                es.pop()
            if es:
                self.axes_to_perm[p] = tuple(es)
        self.sizes: dict[str, int] = dict(sizes)
        self.family = family
        self.heads: dict[str, Heads] = dict(heads or {})
        self.notes: list[str] = list(notes)
        self.output_group = output_group if output_group in self.sizes else None
        self.needs_config = False
        """Whether groups were left fixed because a config.json (the head count) was missing."""
        """The group the model's main output axis follows (a headless model returns its
        residual stream), decided by the family from names and config; None: a fixed output."""
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
                for a in parts(e):
                    out[a.group].append(Member(p, axis, a.inner, a.start, not isinstance(e, Axis)))
        return out

    @cached_property
    def units(self) -> list[tuple[str, ...]]:
        """Groups that must be solved together: tied head groups, and every other group alone."""
        ties: dict[str, list[str]] = {}
        out: list[tuple[str, ...]] = []
        for g in sorted(self.sizes):
            h = self.heads.get(g)
            if h is not None and h.tie is not None:
                if h.tie not in ties:
                    ties[h.tie] = []
                    out.append(())  # placeholder, filled below in first-seen order
                ties[h.tie].append(g)
            else:
                out.append((g,))
        tied = iter(tuple(v) for v in ties.values())
        return [u if u else next(tied) for u in out]

    @cached_property
    def neighbours(self) -> dict[str, set[str]]:
        """Group -> the other groups that share a tensor with it."""
        out: dict[str, set[str]] = {g: set() for g in self.sizes}
        for entries in self.axes_to_perm.values():
            gs = {a.group for e in entries for a in parts(e)}
            for g in gs:
                out[g] |= gs - {g}
        return out

    @property
    def params(self) -> list[str]:
        """Parameters touched by at least one group."""
        return list(self.axes_to_perm)

    def cost_params(self, buffers: Iterable[str] = ()) -> list[str]:
        """The parameters touched by a group that weigh in data-free costs (see :func:`weighs_in_cost`)."""
        skip = set(buffers)
        return [p for p in self.axes_to_perm if weighs_in_cost(p, skip)]

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
            and self.heads == other.heads
        )

    __hash__ = None  # type: ignore[assignment]

    def renamed(self, names: Mapping[str, str]) -> PermutationSpec:
        """This spec with tensors renamed (``old -> new``; others keep their names)."""
        if not names:
            return self
        axes = {names.get(p, p): list(es) for p, es in self.axes_to_perm.items()}
        return PermutationSpec(axes, self.sizes, self.family, self.heads, self.notes, self.output_group)

    def restricted(self, names: Iterable[str]) -> PermutationSpec:
        """This spec without the tensors not in ``names`` (e.g. a tied head stored once)."""
        keep = set(names)
        if all(p in keep for p in self.axes_to_perm):
            return self
        axes = {p: list(es) for p, es in self.axes_to_perm.items() if p in keep}
        used = {a.group for es in axes.values() for e in es for a in parts(e)}
        sizes = {g: n for g, n in self.sizes.items() if g in used}
        heads = {g: h for g, h in self.heads.items() if g in used}
        return PermutationSpec(axes, sizes, self.family, heads, self.notes, self.output_group)

    def without(self, groups: Iterable[str]) -> PermutationSpec:
        """This spec with ``groups`` removed: their axes stay fixed (identity)."""
        drop = set(groups)
        axes = {}
        for p, entries in self.axes_to_perm.items():
            kept: list[AxisEntry] = []
            for e in entries:
                if isinstance(e, Axis):
                    kept.append(None if e.group in drop else e)
                else:
                    kept.append(tuple(a for a in parts(e) if a.group not in drop) or None)
            axes[p] = kept
        sizes = {g: n for g, n in self.sizes.items() if g not in drop}
        heads = {g: h for g, h in self.heads.items() if g not in drop}
        return PermutationSpec(axes, sizes, self.family, heads, self.notes, self.output_group)

    # ------------------------------------------------------------------ validation
    def _structural_problems(self) -> list[str]:
        problems = []
        for g, n in self.sizes.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                problems.append(f"group '{g}': size must be a positive integer, got {n!r}")
        used = set()
        for p, entries in self.axes_to_perm.items():
            for axis, e in enumerate(entries):
                end = 0
                for a in parts(e):
                    used.add(a.group)
                    if a.group not in self.sizes:
                        problems.append(f"'{p}' axis {axis}: group '{a.group}' has no size")
                        continue
                    if not isinstance(a.inner, int) or a.inner < 1:
                        problems.append(f"'{p}' axis {axis}: block size must be a positive integer")
                        continue
                    if not isinstance(a.start, int) or a.start < end:
                        problems.append(f"'{p}' axis {axis}: segments overlap or are out of order")
                    end = a.start + self.sizes[a.group] * a.inner
        for g in self.sizes:
            if g not in used:
                problems.append(f"group '{g}' has no members")
        counts: dict[str, int] = {}
        for g, h in self.heads.items():
            if g not in self.sizes:
                problems.append(f"heads given for unknown group '{g}'")
            elif h.count < 1 or self.sizes[g] % h.count:
                problems.append(f"group '{g}': size {self.sizes[g]} is not a multiple of {h.count} heads")
            if h.tie is not None and counts.setdefault(h.tie, h.count) != h.count:
                problems.append(f"tie '{h.tie}': its groups have different head counts")
        tie_of = {g: h.tie for g, h in self.heads.items() if h.tie is not None}
        for p, entries in self.axes_to_perm.items():
            seen: dict[str, int] = {}
            for axis, e in enumerate(entries):
                for a in parts(e):
                    t = tie_of.get(a.group)
                    if t is not None and seen.setdefault(t, axis) != axis:
                        problems.append(f"tensor '{p}': tied groups of '{t}' sit on two of its axes")
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
                for a in parts(e):
                    want = self.sizes.get(a.group, -1) * a.inner
                    extra = f" x block {a.inner}" if a.inner > 1 else ""
                    if isinstance(e, Axis) and a.start == 0 and shape[axis] != want:
                        problems.append(
                            f"tensor '{p}' axis {axis} has length {shape[axis]}, group "
                            f"'{a.group}' has size {self.sizes.get(a.group)}{extra}"
                        )
                    elif a.start + want > shape[axis]:
                        problems.append(
                            f"tensor '{p}' axis {axis} has length {shape[axis]}, too short for group "
                            f"'{a.group}' (size {self.sizes.get(a.group)}{extra}) from offset {a.start}"
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
            groups[g] = {"size": self.sizes[g]}
            h = self.heads.get(g)
            if h is not None:
                groups[g]["heads"] = h.count
                if h.tie is not None:
                    groups[g]["tie"] = h.tie
            groups[g]["members"] = [member_list(m) for m in members]
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
        axes: dict[str, list[Any]] = {}
        sizes: dict[str, int] = {}
        heads: dict[str, Heads] = {}
        claimed: dict[tuple[str, int, int], str] = {}
        if not isinstance(groups, dict) or not groups:
            problems.append("'groups' must be a non-empty mapping of group name to group")
            groups = {}
        for g, body in groups.items():
            if not isinstance(body, dict):
                problems.append(f"group '{g}': must be a mapping with 'size' and 'members'")
                continue
            for k in body:
                if k not in ("size", "members", "heads", "tie"):
                    problems.append(f"group '{g}': unknown key '{k}'")
            if "heads" in body:
                count, tie = body["heads"], body.get("tie")
                if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                    problems.append(f"group '{g}': 'heads' must be a positive integer")
                elif tie is not None and not isinstance(tie, str):
                    problems.append(f"group '{g}': 'tie' must be a name")
                else:
                    heads[str(g)] = Heads(count, tie)
            elif "tie" in body:
                problems.append(f"group '{g}': 'tie' needs 'heads'")
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
                    and len(m) in (2, 3, 4)
                    and isinstance(m[0], str)
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in m[1:])
                    and m[1] >= 0
                    and (len(m) == 2 or m[2] >= 1)
                    and (len(m) < 4 or m[3] >= 0)
                )
                if not ok:
                    problems.append(
                        f"group '{g}': member {m!r} must be [tensor_name, axis], "
                        "[tensor_name, axis, block_size] or [tensor_name, axis, block_size, offset]"
                    )
                    continue
                param, axis = m[0], m[1]
                inner = m[2] if len(m) >= 3 else 1
                start = m[3] if len(m) == 4 else 0
                if (param, axis, start) in claimed:
                    problems.append(
                        f"'{param}' axis {axis} is claimed by both '{claimed[param, axis, start]}' and '{g}'"
                    )
                    continue
                claimed[param, axis, start] = str(g)
                entries = axes.setdefault(param, [])
                while len(entries) <= axis:
                    entries.append([])
                if entries[axis] and (len(m) == 4) != isinstance(entries[axis], list):
                    problems.append(f"'{param}' axis {axis}: a whole-axis member and segments both claim it")
                    continue
                if len(m) == 4:
                    entries[axis].append(Axis(str(g), inner, start))
                else:
                    entries[axis] = Axis(str(g), inner)
        if problems:
            raise SpecError(problems, "see docs/spec-format.md", source=source)
        family = data.get("family")
        built = {p: [tuple(e) if isinstance(e, list) else e for e in es] for p, es in axes.items()}
        return cls(built, sizes, family=str(family) if family else None, heads=heads)


def member_list(m: Member) -> list[Any]:
    """A member in the file format: [tensor, axis], [.., block] or [.., block, offset]."""
    if m.segment:
        return [m.param, m.axis, m.inner, m.start]
    return [m.param, m.axis] if m.inner == 1 else [m.param, m.axis, m.inner]


def _canonical(e: str | AxisEntry) -> AxisEntry:
    if isinstance(e, str):
        return Axis(e)
    if isinstance(e, tuple):
        return tuple(sorted(e, key=lambda a: a.start)) if e else None
    return e


def load_spec(path: str | Path) -> PermutationSpec:
    """Read a spec from YAML or JSON (strict)."""

    try:
        data = read_data(path, "spec")
    except ConfigError as e:
        raise SpecError(e.message, e.hint, source=e.source) from None
    return PermutationSpec.from_dict(data, source=str(path))


def dump_spec(spec: PermutationSpec, fixed: Sequence[str] = (), as_json: bool = False) -> str:
    """Serialize a spec (YAML by default), listing ``fixed`` tensors for the reader."""

    data = spec.to_dict()
    if fixed:
        data["fixed"] = list(fixed)
    if as_json:
        return json.dumps(data, indent=2) + "\n"
    return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
