"""Apply, invert, compose and draw permutations of a state dict under a spec.

A permutation maps group name -> LongTensor ``p`` where ``p[i]`` is the unit of the original placed
at position ``i``: permuting does ``t.index_select(axis, p)`` on every member axis.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rebasin.checkpoint import LazyStateDict, StateDict
from rebasin.spec.core import Axis, PermutationSpec

Permutation = dict[str, torch.Tensor]


def identity(spec: PermutationSpec) -> Permutation:
    """The identity permutation of every group."""
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, seed: int) -> Permutation:
    """A uniformly random permutation of every group, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(n, generator=gen) for g, n in sorted(spec.sizes.items())}


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
    return (p[:, None] * entry.inner + torch.arange(entry.inner)[None, :]).reshape(-1)


def permute_tensor(
    t: torch.Tensor,
    entries: tuple[Axis | None, ...],
    perm: Mapping[str, torch.Tensor],
    skip: str | None = None,
) -> torch.Tensor:
    """Apply ``perm`` to every permuted axis of ``t`` (except group ``skip``)."""
    for axis, e in enumerate(entries):
        if e is None or e.group == skip or e.group not in perm:
            continue
        t = t.index_select(axis, axis_index(e, perm[e.group].to(t.device)))
    return t


def permute(state: StateDict, spec: PermutationSpec, perm: Permutation) -> StateDict:
    """Permute a state dict (lazily: tensors are produced on access). Untouched tensors pass through."""

    def get(key: str) -> torch.Tensor:
        t = state[key]
        entries = spec.axes_to_perm.get(key)
        return permute_tensor(t, entries, perm) if entries else t

    return LazyStateDict(list(state), get)


def check_permutation(spec: PermutationSpec, perm: Permutation) -> None:
    """Raise ValueError unless ``perm`` holds a valid permutation of every group's size."""
    for g, n in spec.sizes.items():
        if g not in perm:
            raise ValueError(f"permutation lacks group '{g}'")
        v = perm[g]
        if v.shape != (n,) or not torch.equal(torch.sort(v).values, torch.arange(n)):
            raise ValueError(f"group '{g}': not a permutation of {n} units")
