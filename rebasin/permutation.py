"""Apply, invert, compose and draw permutations of a state dict under a spec.

A permutation maps group name -> LongTensor ``p`` where ``p[i]`` is the unit of the original placed
at position ``i``: permuting does ``t.index_select(axis, p)`` on every member axis.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rebasin.checkpoint import LazyStateDict, StateDict
from rebasin.checkpoint.state import info_of
from rebasin.spec.core import Axis, AxisEntry, PermutationSpec, parts

Permutation = dict[str, torch.Tensor]


def identity(spec: PermutationSpec) -> Permutation:
    """The identity permutation of every group."""
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, seed: int) -> Permutation:
    """A uniformly random permutation of every group, reproducible from ``seed``. Groups with
    heads get a random head order (shared by tied groups) and random orders within each head."""
    gen = torch.Generator().manual_seed(seed)
    out: Permutation = {}
    for unit in spec.units:
        if unit[0] not in spec.heads:
            out[unit[0]] = torch.randperm(spec.sizes[unit[0]], generator=gen)
            continue
        k = spec.heads[unit[0]].count
        sigma = torch.randperm(k, generator=gen)
        for g in unit:
            d = spec.sizes[g] // k
            out[g] = torch.cat([sigma[i] * d + torch.randperm(d, generator=gen) for i in range(k)])
    return out


def invert(p: Permutation) -> Permutation:
    """The inverse: ``permute(permute(s, p), invert(p)) == s``."""
    return {g: torch.argsort(v) for g, v in p.items()}


def compose(first: Permutation, second: Permutation) -> Permutation:
    """The permutation equal to applying ``first`` and then ``second``."""
    return {g: first[g][second[g]] if g in second else first[g] for g in first} | {
        g: v for g, v in second.items() if g not in first
    }


def is_identity(p: Permutation) -> bool:
    """Whether every group maps each unit to itself."""
    return all(bool(torch.equal(v, torch.arange(len(v)))) for v in p.values())


def axis_index(entry: Axis, p: torch.Tensor) -> torch.Tensor:
    """Index along an axis of length ``size * inner`` that moves blocks of ``inner`` by ``p``."""
    if entry.inner == 1:
        return p
    return (p[:, None] * entry.inner + torch.arange(entry.inner, device=p.device)[None, :]).reshape(-1)


def take(t: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """``t.index_select(axis, idx)``, by advanced indexing where that is faster (2-byte floats
    along an inner axis: about 1.8x on CPU); the same values either way."""
    if axis > 0 and t.element_size() == 2:
        return t[(slice(None),) * axis + (idx,)]
    return t.index_select(axis, idx)


def permute_tensor(
    t: torch.Tensor,
    entries: tuple[AxisEntry, ...],
    perm: Mapping[str, torch.Tensor],
    skip: str | None = None,
) -> torch.Tensor:
    """Apply ``perm`` to every permuted axis of ``t`` (except group ``skip``)."""
    for axis, e in enumerate(entries):
        segs = [a for a in parts(e) if a.group != skip and a.group in perm]
        if not segs:
            continue
        if isinstance(e, Axis):
            idx = axis_index(e, perm[e.group].to(t.device))
        else:  # segments of a fused axis: each moves within its own stretch
            idx = torch.arange(t.shape[axis], device=t.device)
            for a in segs:
                p = axis_index(a, perm[a.group].to(t.device))
                idx[a.start : a.start + len(p)] = a.start + p
        t = take(t, axis, idx)
    return t


def permute(state: StateDict, spec: PermutationSpec, perm: Permutation) -> StateDict:
    """Permute a state dict (lazily: tensors are produced on access). Untouched tensors pass through."""

    def get(key: str) -> torch.Tensor:
        t = state[key]
        entries = spec.axes_to_perm.get(key)
        return permute_tensor(t, entries, perm) if entries else t

    return LazyStateDict(list(state), get, info_of(state))


def check_permutation(spec: PermutationSpec, perm: Permutation) -> None:
    """Raise ValueError unless ``perm`` holds a valid permutation of every group's size."""
    for g, n in spec.sizes.items():
        if g not in perm:
            raise ValueError(f"permutation lacks group '{g}'")
        v = perm[g]
        if v.shape != (n,) or not torch.equal(torch.sort(v).values, torch.arange(n)):
            raise ValueError(f"group '{g}': not a permutation of {n} units")
    for unit in spec.units:
        if unit[0] not in spec.heads:
            continue
        k = spec.heads[unit[0]].count
        sigmas = []
        for g in unit:
            blocks = perm[g].view(k, -1) // (spec.sizes[g] // k)
            if not bool((blocks == blocks[:, :1]).all()):
                raise ValueError(f"group '{g}': the permutation splits a head")
            sigmas.append(blocks[:, 0])
        if any(not torch.equal(s, sigmas[0]) for s in sigmas):
            raise ValueError(f"groups {', '.join(unit)}: tied heads move differently")
