"""Weight-matching costs with bounded memory: ``C_g[i, j] = <A unit i, pi(B) unit j>``.

Tensors are taken from the mappings one member at a time, in their stored dtype (a lazy
checkpoint reads them from disk then), moved to the device (a GPU's through pinned memory on a
copy stream of their own: :mod:`rebasin.matching.transfer`), and multiplied a block of columns
at a time, each block upcast to float32 only for its product: the memory a product needs is one
member's tensors plus a block, never a model. State dicts in memory and checkpoints read from
disk take the same path and give the same bits.

Only what changed is paid for. A member's product depends on the permutations of its other axes
only, through the order of its contracted columns. Each group keeps its cost with the column
orders it was computed under (:class:`ProductCache`: in memory for small models, else in scratch
files): when the neighbours moved k of a member's columns, the cost is updated by those k columns
(``A[:, S] (B[:, new S] - B[:, old S])^T``) instead of recomputed; when nothing moved it is
reused; past :data:`UPDATE_SHARE` of the columns it is recomputed. Members no other group
touches are computed once.

What moved a lot is paid for while it is in memory. One group shares more tensors with the
others than any (a transformer's residual stream: every layer's). The tensors of a unit that
shares some with it are held from the unit's products to its assignment (up to
:data:`HOLD_BYTES`, or larger when the assignment is quick: read off the rows, or in blocks of
heads); when the assignment moved the unit, that group's products of them, stale past an update,
are computed under the new order into its *fresh* cost (:meth:`CostModel.solved`), as soon as
the thread that computes costs is between two members. Its next cost sums them and reads only
the members no solve covered: on planted TinyLlama- and 7B-shape pairs the residual stream's
second cost reads nothing, where it read the whole model.

Half-precision inputs are multiplied at the hardware's half-precision rate where that is exact:
on CUDA, bfloat16 and float16 in TF32 (which holds their mantissas); on CPUs with bfloat16 matrix
units (AMX, AVX512-BF16), bfloat16 as bfloat16 with float32 accumulation. The products equal
float32 ones up to the order of summation. Updates multiply differences of weights, which are not
half-precision values, in plain float32.
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from rebasin.checkpoint.state import shape_of, tensor_info
from rebasin.core.errors import MatchError
from rebasin.core.types import Permutation
from rebasin.matching.assignment import read_off
from rebasin.matching.transfer import Uploader
from rebasin.permutation import permute_tensor, take
from rebasin.spec.core import Member, PermutationSpec, parts

BLOCK_BYTES = 64 << 20
"""Largest float32 block of a member's columns upcast at once for a product."""

_CHUNK = 1 << 20
"""Elements per float64 block of the objective's dot products on a GPU."""

_DOT_BLOCK = 1 << 16
"""Elements per float64 block of the objective's dot products on the CPU."""

UPDATE_SHARE = 0.5
"""Largest share of a group's contracted columns that may have moved for its kept product to be
updated rather than recomputed (an update of more costs as much and adds rounding)."""

MEMORY_BYTES = 16 << 20
"""Kept costs stay in memory (on the device) when they all fit in this many bytes together."""

SCRATCH_RESERVE = 4 << 30
"""Free disk space that scratch files for kept products never take."""

HOLD_BYTES = 192 << 20
"""Largest size of a unit's tensors (A and B, as stored) held from its products to any
assignment, for the gathering group's products (:meth:`CostModel.solved`). The units in flight
are held at once (:meth:`CostModel.held_bytes`): two, about 400 MB, with one assignment at a
time; with more at once, the assignments' own matrices take more (16 n^2 bytes each: 510 MB at
a TinyLlama-shape MLP group). A TinyLlama-shape MLP unit (138 MB) is held. A larger unit (a
LLaMA-7B-shape unit's 268-540 MB) is held only through a quick assignment (:meth:`CostModel._quick`),
and released as soon as the next unit's first product is done: held through every assignment,
the 7B merge measured no faster on 2 cores (573-630 s against 557-569 s) and peaked at
4.9-10.4 GB against 3.8-4.1."""

DEVICE_RESERVE = 8 << 30
"""GPU memory a run keeps free beyond the models it holds there (:attr:`CostModel.resident`):
the products' blocks, the cost matrices and the allocator's slack; at least an eighth of the
device."""

WRITES_AHEAD = 1
"""Kept costs that may wait, in memory, to be written to their scratch files: one is written
while the next unit's products run (a TinyLlama MLP group's 127 MB in about 0.3 s against about
1 s of products), so one more costs the memory of a cost (485 MB at a 7B MLP group) for nothing."""

FRESH_BYTES = 256 << 20
"""Largest fresh cost (:meth:`CostModel.solved`) kept in memory: 4 n^2 bytes for a group of n."""


Held = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""A unit's tensors of A and B as read, by parameter (:meth:`CostModel.unit_costs`)."""


class CostModel:
    """The cost matrices and objective of weight matching between two state dicts."""

    def __init__(
        self,
        a: Mapping[str, torch.Tensor],
        b: Mapping[str, torch.Tensor],
        spec: PermutationSpec,
        device: torch.device,
        buffers: Collection[str] = (),
        memory_bytes: int | None = None,
        scratch: bool = True,
        known: Mapping[str, float] | None = None,
        first: GroupProducts | None = None,
        resident: bool | None = None,
    ):
        """``known``: :func:`param_dot` of parameters of A and B as stored, taken by a pass that
        read both anyway (the input scan): the objective uses them wherever every axis of the
        parameter is unmoved, instead of reading it. ``first``: a group's products at the
        identity, taken by such a pass: its cost starts from them (its members they cover are
        not read while their columns have not moved). Both only on the CPU, where they were
        taken. ``resident``: keep every tensor read on the device (:attr:`resident`; None: on
        a GPU with room for both models)."""
        self.spec = spec
        self.device = device
        weighed = spec.cost_params(buffers)
        self.params = weighed
        self._a, self._b = a, b
        names = set(weighed)
        self.members = {g: [m for m in ms if m.param in names] for g, ms in spec.groups.items()}
        self._moving = {  # members whose B side other groups also permute
            m for ms in self.members.values() for m in ms if _other_axes(spec, m)
        }
        self._fixed: dict[str, torch.Tensor | None] = {}  # by group and sketch
        self._numel = {p: math.prod(shape_of(a, p)) for p in weighed}
        self.sketch = 1
        """Keep one in ``sketch`` of each product's contracted columns (a random, fixed subset,
        scaled up to an unbiased estimate): cheap approximate costs for a first phase. 1: exact."""
        self._sketched: dict[tuple[Member, int], torch.Tensor] = {}
        moving_work = {
            g: self._work(g, [m for m in ms if m in self._moving]) for g, ms in self.members.items()
        }
        room = _device_room(device)
        pair_bytes = sum(self._bytes(p) for p in weighed)
        self.resident = pair_bytes <= room if resident is None else resident
        """Whether the tensors read stay on the device, each read once (a GPU with room for
        both models: an H200 holds a LLaMA-7B pair), instead of read again for each product."""
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}
        self._upload = Uploader(device)
        if memory_bytes is None:  # a GPU keeps the kept costs in the room left
            memory_bytes = max(MEMORY_BYTES, room - (pair_bytes if self.resident else 0))
        self.kept = ProductCache(
            {g: spec.sizes[g] for g, w in moving_work.items() if w > 0}, moving_work, memory_bytes, scratch
        )
        self.products = {"full": 0.0, "update": 0.0, "reused": 0.0}
        """Multiply-adds spent on full products and on updates, and those saved by reuse."""
        self.seconds = {"products": 0.0, "objective": 0.0}
        self.bytes_read = {"products": 0, "objective": 0}
        self._phase = "products"
        self._lock = threading.Lock()
        self._reader: ThreadPoolExecutor | None = None
        self._known = dict(known or {}) if device.type == "cpu" else {}
        self._shared: dict[str, list[tuple[str, Member]]] = {}  # param -> its moving members
        for g, ms in self.members.items():
            for m in ms:
                if m in self._moving:
                    self._shared.setdefault(m.param, []).append((g, m))
        self.gather = self._gathering()
        """The group whose fresh cost its neighbours' solves fill (:meth:`solved`), or None."""
        self._held: dict[tuple[str, ...], Held] = {}
        self._pending: list[tuple[Held, Permutation]] = []
        self._fresh: dict[str, tuple[torch.Tensor, dict[Member, torch.Tensor]]] = {}
        if first is not None and device.type == "cpu" and first.covered:
            self._start_from(first)

    def moving_members(self, g: str) -> list[Member]:
        """The group's members whose tensors other groups also permute."""
        return [m for m in self.members[g] if m in self._moving]

    def tensor(self, side: str, p: str) -> torch.Tensor:
        """Parameter ``p`` of A or B on the device, as stored (read once when :attr:`resident`)."""
        if self.resident:
            with self._lock:
                kept = self._on_device.get((side, p))
            if kept is not None:
                return kept
        src = self._a if side == "a" else self._b
        t = src[p]
        with self._lock:
            self.bytes_read[self._phase] += t.numel() * t.element_size()
        t = self._upload(t)
        if self.resident:
            with self._lock:
                t = self._on_device.setdefault((side, p), t)
        return t

    def _work(self, g: str, members: Collection[Member]) -> float:
        return float(sum(self.spec.sizes[g] * self._numel[m.param] for m in members))

    def work(self, unit: tuple[str, ...]) -> float:
        """Multiply-adds of the unit's cost products, computed in full (for progress and estimates)."""
        return sum(self._work(g, self.members[g]) for g in unit) / self.sketch

    def reach(self, unit: tuple[str, ...]) -> float:
        """Multiply-adds of the costs a move of ``unit`` makes stale: its neighbours' products."""
        near = set().union(*(self.spec.neighbours[g] for g in unit)) - set(unit)
        return sum(self._work(g, self.members[g]) for g in near)

    def unit_costs(self, unit: tuple[str, ...], perm: Permutation) -> dict[str, np.ndarray]:
        """The cost matrix of every group of ``unit`` (float32 numpy, for the assignment). The
        tensors read for them are held for :meth:`solved` when a neighbour has use for them."""
        self._gather()
        hold: Held | None = {} if self._shares_gather(unit) else None
        costs = {g: self.cost(g, perm, hold) for g in unit}
        if hold and (self._unit_bytes(unit) <= HOLD_BYTES or self._quick(unit, costs)):
            with self._lock:
                self._held[unit] = hold
        return costs

    def cost(self, g: str, perm: Permutation, hold: Held | None = None) -> np.ndarray:
        """``C[i, j] = <A unit i, B unit j>`` summed over the group's members (others applied).
        ``hold`` collects the tensors read, by parameter."""
        self._gather()
        t0 = time.perf_counter()
        moving = self.moving_members(g)
        orders = {m: self._order(g, m, perm) for m in moving}
        with self._lock:
            fresh = self._fresh.pop(g, None)
        c = self._kept_cost(g, perm, moving, orders, fresh, hold) if moving else None
        if c is None:
            n = self.spec.sizes[g]
            c = torch.zeros(n, n, dtype=torch.float32, device=self.device)
            fixed_part = self._fixed_part(g, perm)
            if fixed_part is not None:
                c += fixed_part
            if moving:
                c += self._sum_products(g, {m: self._columns(m, orders[m]) for m in moving}, hold)
                self.kept.put(g, self.sketch, c, orders)
        out = c.cpu().numpy()  # float32: the assignment upcasts once, sums run in float64
        if not np.isfinite(out).all():
            raise MatchError(f"cost matrix of group '{g}' is not finite (weights too large?)")
        self.seconds["products"] += time.perf_counter() - t0
        return out

    def _fixed_part(self, g: str, perm: Permutation) -> torch.Tensor | None:
        """The product of the members no other group touches: it never changes (computed once)."""
        key = f"{g}/{self.sketch}"
        if key not in self._fixed:
            fixed = [m for m in self.members[g] if m not in self._moving]
            maps = {m: self._columns(m, self._order(g, m, perm)) for m in fixed}
            self._fixed[key] = self._sum_products(g, maps) if fixed else None
        return self._fixed[key]

    def _kept_cost(
        self,
        g: str,
        perm: Permutation,
        moving: list[Member],
        orders: dict[Member, torch.Tensor],
        fresh: tuple[torch.Tensor, dict[Member, torch.Tensor]] | None,
        hold: Held | None,
    ) -> torch.Tensor | None:
        """The group's cost from what is kept: its kept cost updated by the columns that moved
        since it was computed, or its fresh cost (:meth:`solved`) with the members it lacks
        computed in full and those that moved since updated, whichever multiplies less; None
        when neither beats computing it in full."""
        n = self.spec.sizes[g]
        full = self._work(g, moving) / self.sketch
        plans: list[tuple[float, str]] = []
        kept_orders = self.kept.orders(g, self.sketch)
        if kept_orders is not None:
            moved = self._moved_columns(moving, orders, kept_orders)
            if moved <= UPDATE_SHARE * sum(self._width(m) for m in moving):
                plans.append((n * moved, "kept"))
        if fresh is not None:
            have = {m: o for m, o in fresh[1].items() if m in orders}
            lack = [m for m in moving if m not in have]
            plans.append(
                (self._work(g, lack) / self.sketch + n * self._moved_columns(have, orders, have), "fresh")
            )
        if not plans or min(plans)[0] >= full:
            return None
        if min(plans)[1] == "fresh":
            assert fresh is not None
            return self._fresh_cost(g, perm, moving, orders, fresh, hold)
        kept = self.kept.get(g, self.sketch, self.device)
        if kept is None:
            return None
        value, before = kept
        self._apply_moves(
            value, g, [m for m in moving if not torch.equal(orders[m], before[m])], orders, before, hold
        )
        self.products["reused"] += full - n * self._moved_columns(moving, orders, before)
        self.kept.put(g, self.sketch, value, orders)
        return value

    def _fresh_cost(
        self,
        g: str,
        perm: Permutation,
        moving: list[Member],
        orders: dict[Member, torch.Tensor],
        fresh: tuple[torch.Tensor, dict[Member, torch.Tensor]],
        hold: Held | None,
    ) -> torch.Tensor:
        """The group's cost from its fresh products: the members they lack computed in full,
        those that moved since updated, and the fixed members' product added."""
        value, before = fresh
        value = value.to(self.device)
        lack = [m for m in moving if m not in before]
        stale = [m for m in moving if m in before and not torch.equal(orders[m], before[m])]
        self._apply_moves(value, g, stale, orders, before, hold)
        if lack:
            value += self._sum_products(g, {m: self._columns(m, orders[m]) for m in lack}, hold)
        fixed_part = self._fixed_part(g, perm)
        if fixed_part is not None:
            value += fixed_part
        self.products["reused"] += self._work(g, [m for m in moving if m in before]) / self.sketch
        self.kept.put(g, self.sketch, value, orders)
        return value

    def _moved_columns(
        self,
        members: Collection[Member],
        orders: Mapping[Member, torch.Tensor],
        before: Mapping[Member, torch.Tensor],
    ) -> int:
        """Contracted columns of ``members`` whose B column differs between two orders."""
        return sum(
            int((self._columns(m, orders[m]) != self._columns(m, before[m])).sum())
            for m in members
            if not torch.equal(orders[m], before[m])
        )

    def _apply_moves(
        self,
        value: torch.Tensor,
        g: str,
        stale: Sequence[Member],
        orders: Mapping[Member, torch.Tensor],
        before: Mapping[Member, torch.Tensor],
        hold: Held | None,
    ) -> None:
        """Update ``value`` by the columns of ``stale`` members that moved from ``before``."""
        maps = {m: self._columns(m, orders[m]) for m in stale}
        olds = {m: self._columns(m, before[m]) for m in stale}
        for m, ra, rb in self._operand_stream(g, list(stale), hold):
            at = torch.nonzero(maps[m] != olds[m]).squeeze(1)
            self._update(value, ra, rb, g, m, at, maps[m], olds[m])

    def _start_from(self, first: GroupProducts) -> None:
        """Seed the group's fresh cost (and its fixed members' product, when all are covered)."""
        g = first.group
        ident = {h: torch.arange(k) for h, k in self.spec.sizes.items()}
        moving = {m: self._order(g, m, ident) for m in self.moving_members(g) if m in first.covered}
        if moving:
            self._fresh[g] = (first.moving.clone(), moving)  # a run changes its own copy
        fixed = [m for m in self.members[g] if m not in self._moving]
        if fixed and all(m in first.covered for m in fixed):
            self._fixed[f"{g}/1"] = first.fixed

    def _gathering(self) -> str | None:
        """The group that shares the most bytes of tensors with other groups (a transformer's
        residual stream), when its fresh cost fits in :data:`FRESH_BYTES`: re-reading its
        members is what its neighbours' moves cost most. One group, so that the memory held
        stays that of a layer, not of the model."""
        shared = {g: sum(self._bytes(m.param) for m in self.moving_members(g)) for g in self.members}
        best = max(sorted(shared), key=lambda g: shared[g], default=None)
        if best is None or not shared[best] or 4 * self.spec.sizes[best] ** 2 > FRESH_BYTES:
            return None
        return best

    def _bytes(self, p: str) -> int:
        """Bytes of parameter ``p`` of A and B together, as stored."""
        return 2 * self._numel[p] * tensor_info(self._a, p).dtype.itemsize

    def held_bytes(self, in_flight: int = 2) -> int:
        """The most bytes of tensors held for :meth:`solved` at once, for ``--dry-run``'s memory
        estimate: ``in_flight`` units' (those being solved and the next one, computed ahead),
        or one larger unit's, held while its products run and its quick solve
        (:meth:`_quick`)."""
        sizes = [self._unit_bytes(u) for u in self.spec.units if self._shares_gather(u)]
        small = [b for b in sizes if b <= HOLD_BYTES]
        return max(in_flight * max(small, default=0), max(sizes, default=0))

    def _unit_params(self, unit: tuple[str, ...]) -> set[str]:
        """The parameters of the unit's members that other groups also permute."""
        return {m.param for g in unit for m in self.moving_members(g)}

    def _unit_bytes(self, unit: tuple[str, ...]) -> int:
        return sum(self._bytes(p) for p in self._unit_params(unit))

    def _shares_gather(self, unit: tuple[str, ...]) -> bool:
        """Whether the unit's tensors are of use to the gathering group (:attr:`gather`) after its
        assignment: exact costs, a unit that is not that group and shares tensors with it. They
        are held for :meth:`solved` within :data:`HOLD_BYTES`, or when the solve is quick."""
        if self.sketch != 1 or self.gather is None or self.gather in unit:
            return False
        return any(h == self.gather for p in self._unit_params(unit) for h, _ in self._shared[p])

    def _quick(self, unit: tuple[str, ...], costs: Mapping[str, np.ndarray]) -> bool:
        """Whether the unit's assignment takes a moment, so that its tensors, however large, are
        held through it (and the residual stream's next cost does not read them again): every
        cost read off the rows (:func:`read_off`: a planted or aligned pair), or a head-structured
        unit, solved in blocks of one head's units (0.24 s at a LLaMA-7B attention unit). Only
        units past :data:`HOLD_BYTES` ask; the solver reads the rows again (one pass over the
        cost, about 0.1 s at a 7B MLP group, where it may run in a worker process)."""
        if any(g in self.spec.heads for g in unit):
            return True
        return all(read_off(c) is not None for c in costs.values())

    def solved(self, unit: tuple[str, ...], perm: Permutation, moved: bool) -> None:
        """The unit's assignment is done (``moved``: it changed ``perm``). Its held tensors are
        released, or, if it moved, left for the gathering group's products of them
        (:attr:`gather`) under ``perm``, which the next cost computes first (:meth:`_gather`),
        in the thread that computes costs: the caller goes on to the next assignment."""
        with self._lock:
            held = self._held.pop(unit, None)
            if held and moved and self.sketch == 1:
                self._pending.append((held, dict(perm)))

    def _gather(self, timed: bool = True) -> None:
        """The gathering group's products of the tensors of units solved since the last cost,
        each under the permutation its solve left, into the group's fresh cost, where its kept
        cost could not be updated by them (more than :data:`UPDATE_SHARE` of a member's columns
        moved)."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                held, perm = self._pending.pop(0)
            t0 = time.perf_counter()
            kept = self.kept.orders(self.gather, 1) if self.gather is not None else None
            for p, (ta, tb) in held.items():
                for g, m in self._shared[p]:
                    if g == self.gather:
                        self._contribute(g, m, ta, tb, perm, kept)
            del held
            if timed:
                self.seconds["products"] += time.perf_counter() - t0

    def _contribute(
        self,
        g: str,
        m: Member,
        ta: torch.Tensor,
        tb: torch.Tensor,
        perm: Permutation,
        kept: dict[Member, torch.Tensor] | None,
    ) -> None:
        """Bring member ``m`` of group ``g`` up to ``perm`` in g's fresh cost, from its tensors."""
        order = self._order(g, m, perm)
        cols = self._columns(m, order)
        if kept is not None and m in kept:
            moved = int((cols != self._columns(m, kept[m])).sum())
            if moved <= UPDATE_SHARE * self._width(m):
                return  # the kept cost is updated by it, for less
        n = self.spec.sizes[g]
        with self._lock:
            fresh = self._fresh.get(g)
            if fresh is None:
                fresh = self._fresh[g] = (torch.zeros(n, n, dtype=torch.float32, device=self.device), {})
        value, before = fresh
        ra, rb = _unit_rows(ta, m, n), _unit_rows(tb, m, n)
        if m in before:
            if torch.equal(before[m], order):
                return
            old = self._columns(m, before[m])
            self._update(value, ra, rb, g, m, torch.nonzero(cols != old).squeeze(1), cols, old)
        else:
            self._product_into(value, ra, rb, m, cols)
            self.products["full"] += n * self._numel[m.param]
        before[m] = order

    def _operands(self, g: str, m: Member, hold: Held | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A's and B's (unpermuted) rows of the member, one per unit of ``g`` (the tensors kept in
        ``hold`` by parameter, and taken from there when already read)."""
        n = self.spec.sizes[g]
        pair = hold.get(m.param) if hold is not None else None
        if pair is None:
            pair = self.tensor("a", m.param), self.tensor("b", m.param)
            if hold is not None:
                hold[m.param] = pair
        return _unit_rows(pair[0], m, n), _unit_rows(pair[1], m, n)

    def _operand_stream(
        self,
        g: str,
        members: Sequence[Member],
        hold: Held | None = None,
    ) -> Iterator[tuple[Member, torch.Tensor, torch.Tensor]]:
        """Each member with its operands (:meth:`_operands`), the next member's read in a thread
        while the caller computes with these: reads from disk overlap the products, at the cost
        of one member's tensors more in memory."""
        if len(members) < 2:
            for m in members:
                yield m, *self._operands(g, m, hold)
            return
        with self._lock:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="rebasin-read")
            pool = self._reader
        ahead = pool.submit(self._operands, g, members[0], hold)
        try:
            for i, m in enumerate(members):
                if i and g != self.gather:  # units solved meanwhile release their tensors
                    self._gather(timed=False)  # inside the cost's own time
                ra, rb = ahead.result()
                if i + 1 < len(members):
                    ahead = pool.submit(self._operands, g, members[i + 1], hold)
                yield m, ra, rb
                del ra, rb
        finally:
            ahead.cancel()

    def _order(self, g: str, m: Member, perm: Permutation) -> torch.Tensor:
        """The member's contracted columns in pi(B), as the columns of B they hold, without
        ``inner`` (int32, compact: what the kept products remember)."""
        shape = list(shape_of(self._a, m.param))
        entries = list(self.spec.axes_to_perm[m.param])
        shape[m.axis], entries[m.axis] = 1, None
        probe = torch.arange(math.prod(shape), dtype=torch.int32).reshape(shape)
        return permute_tensor(probe, tuple(entries), perm, skip=g).movedim(m.axis, 0).reshape(-1)

    def _width(self, m: Member) -> int:
        """Contracted columns of the member's products (the sketched ones when sketching)."""
        shape = shape_of(self._a, m.param)
        width = m.inner * self._numel[m.param] // shape[m.axis]
        return width // self.sketch if self.sketch > 1 and width >= 2 * self.sketch else width

    def _columns(self, m: Member, order: torch.Tensor) -> torch.Tensor:
        """For each contracted column of the member's rows in pi(B) (the sketched ones when
        sketching), the column of B's rows it holds (int64, on the device)."""
        cols = order.long()
        if m.inner > 1:
            cols = (torch.arange(m.inner)[:, None] * len(order) + cols[None, :]).reshape(-1)
        width = len(cols)
        if self.sketch > 1 and width >= 2 * self.sketch:
            cols = cols[self._sketch_columns(m, width)]
        return cols.to(self.device)

    def _sum_products(
        self,
        g: str,
        maps: Mapping[Member, torch.Tensor],
        hold: Held | None = None,
    ) -> torch.Tensor:
        n = self.spec.sizes[g]
        c = torch.zeros(n, n, dtype=torch.float32, device=self.device)
        for m, ra, rb in self._operand_stream(g, list(maps), hold):
            self._product_into(c, ra, rb, m, maps[m])
            del ra, rb
        self.products["full"] += self._work(g, maps) / self.sketch
        return c

    def _product_into(
        self, c: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor, m: Member, cols: torch.Tensor
    ) -> None:
        """Add the member's product to ``c``: A's rows ``ra`` against B's rows ``rb`` with their
        columns ``cols`` (:meth:`_columns`)."""
        scale = ra.shape[1] / len(cols)
        sketched = len(cols) < ra.shape[1]
        if sketched:
            ra = ra.index_select(1, self._sketch_columns(m, ra.shape[1]).to(self.device))
        if sketched or not _is_identity(cols):
            rb = take(rb, 1, cols)
        add_product(c, ra, rb, scale)

    def _update(
        self,
        c: torch.Tensor,
        ra: torch.Tensor,
        rb: torch.Tensor,
        g: str,
        m: Member,
        at: torch.Tensor,
        new: torch.Tensor,
        old: torch.Tensor,
    ) -> None:
        """Add to ``c`` the change of a member's product (operands ``ra``, ``rb``) when its
        columns ``at`` (positions in the column maps) moved from ``old`` to ``new``."""
        n = self.spec.sizes[g]
        scale = ra.shape[1] / len(new)
        a_cols = at if len(new) == ra.shape[1] else self._sketch_columns(m, ra.shape[1]).to(self.device)[at]
        for lo, hi in _blocks(len(at), n):  # plain float32: the differences are not half-precision
            d = take(rb, 1, new[at[lo:hi]]).float()
            d -= take(rb, 1, old[at[lo:hi]])
            c.addmm_(take(ra, 1, a_cols[lo:hi]).float(), d.T, alpha=scale)
            del d
        self.products["update"] += n * n * len(at)

    def _sketch_columns(self, m: Member, k: int) -> torch.Tensor:
        """The member's random subset of ``k // sketch`` columns, the same every time (seeded by
        the member's place in the spec)."""
        key = (m, self.sketch)
        if key not in self._sketched:
            seed = sorted(self.spec.axes_to_perm).index(m.param) * 1009 + m.axis
            g = torch.Generator().manual_seed(seed)
            self._sketched[key] = torch.randperm(k, generator=g)[: k // self.sketch].sort().values
        return self._sketched[key]

    def objective(self, perm: Permutation) -> float:
        """``sum_params <A, pi(B)>`` over the weighed parameters, accumulated in float64."""
        return self.objectives([perm])[0]

    def objectives(self, perms: Sequence[Permutation]) -> list[float]:
        """:meth:`objective` of several permutations, reading each tensor once for all (and not
        at all where its value is known for every one of them)."""
        t0 = time.perf_counter()
        self._phase = "objective"
        totals = [torch.zeros((), dtype=torch.float64, device=self.device) for _ in perms]
        moved = [{g for g, v in perm.items() if not _is_identity(v)} for perm in perms]
        scratch: dict[str, torch.Tensor] = {}
        try:
            for p in self.params:
                axes = self.spec.axes_to_perm[p]
                groups = {a.group for e in axes for a in parts(e)}
                todo = []
                for total, perm, gone in zip(totals, perms, moved, strict=True):
                    if p in self._known and groups.isdisjoint(gone):
                        total += self._known[p]
                    else:
                        todo.append((total, perm))
                if not todo:
                    continue
                x = self.tensor("a", p)
                tb = self.tensor("b", p)
                for total, perm in todo:
                    total += param_dot(x, permute_tensor(tb, axes, perm), scratch)
        finally:
            self._phase = "products"
        self.seconds["objective"] += time.perf_counter() - t0
        return [float(t) for t in totals]

    def profile(self) -> dict[str, float | int]:
        """Where the time and the reads went: seconds and bytes read for the products and the
        exact objective, multiply-adds computed in full, by updates and saved, and the kept
        products' memory and scratch bytes, and whether the models stayed on the device."""
        return {
            "products_s": round(self.seconds["products"], 4),
            "objective_s": round(self.seconds["objective"], 4),
            "products_read_bytes": self.bytes_read["products"],
            "objective_read_bytes": self.bytes_read["objective"],
            "full_madds": self.products["full"],
            "update_madds": self.products["update"],
            "saved_madds": self.products["reused"],
            "kept_memory_bytes": self.kept.memory_bytes,
            "kept_scratch_bytes": self.kept.scratch_bytes,
            "scratch_read_bytes": self.kept.scratch_read,
            "scratch_written_bytes": self.kept.scratch_written,
            "resident": int(self.resident),
        }

    def close(self) -> None:
        """Drop the kept products and remove their scratch files; stop the reader thread."""
        self.kept.close()
        with self._lock:
            self._held.clear()
            self._pending.clear()
            self._fresh.clear()
            self._on_device.clear()
        if self._reader is not None:
            self._reader.shutdown(cancel_futures=True)
            self._reader = None


class ProductCache:
    """Each group's kept cost with the column orders it was computed under.

    When every kept cost fits in ``memory_bytes`` together (small models), they stay in memory;
    otherwise each goes to a scratch file in a temporary folder (read back from the page cache
    when it has room), while the disk keeps :data:`SCRATCH_RESERVE` free: long-lived blocks in
    the heap between the products' short-lived ones would keep it from shrinking. A group with
    no place is recomputed each time. Scratch files are written in a thread, while the products
    go on (a cost waiting to be written is served from memory, at most :data:`WRITES_AHEAD` of
    them); they are removed by :meth:`close` (or when the cache is collected)."""

    def __init__(self, sizes: Mapping[str, int], work: Mapping[str, float], memory_bytes: int, scratch: bool):
        self._lock = threading.Lock()
        self._items: dict[str, tuple[int, torch.Tensor | Path, dict[Member, torch.Tensor]]] = {}
        self.place: dict[str, str] = {}
        self._dir: Path | None = None
        total = sum(4 * n**2 for n in sizes.values())
        free = 0 if total <= memory_bytes or not scratch else _free_scratch()
        disk = 0
        for g in sorted(sizes, key=lambda g: (-work[g] / sizes[g] ** 2, g)):  # most work per byte first
            nbytes = 4 * sizes[g] ** 2
            if total <= memory_bytes:
                self.place[g] = "memory"
            elif disk + nbytes <= free:
                self.place[g], disk = "scratch", disk + nbytes
        self.memory_bytes = total if total <= memory_bytes else 0
        self.scratch_bytes = disk
        self.scratch_read = self.scratch_written = 0
        self._writer: ThreadPoolExecutor | None = None
        self._writes = threading.BoundedSemaphore(WRITES_AHEAD)
        if disk:
            self._dir = Path(tempfile.mkdtemp(prefix="rebasin-products-"))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)

    def get(
        self, g: str, sketch: int, device: torch.device
    ) -> tuple[torch.Tensor, dict[Member, torch.Tensor]] | None:
        """The kept cost (a tensor of its own: the caller may change it and put it back) and the
        column orders it was computed under."""
        with self._lock:
            item = self._items.get(g)
        if item is None or item[0] != sketch:
            return None
        value = item[1]
        if isinstance(value, Path):  # written: no thread writes it until the next put
            arr = np.fromfile(value, dtype=np.float32)
            self.scratch_read += arr.nbytes
            n = math.isqrt(arr.size)
            return torch.from_numpy(arr.reshape(n, n)).to(device), item[2]
        return value.clone(), item[2]

    def orders(self, g: str, sketch: int) -> dict[Member, torch.Tensor] | None:
        """The column orders the kept cost was computed under (None when none is kept)."""
        with self._lock:
            item = self._items.get(g)
        return item[2] if item is not None and item[0] == sketch else None

    def put(self, g: str, sketch: int, value: torch.Tensor, maps: dict[Member, torch.Tensor]) -> None:
        """Keep ``value`` for group ``g`` (in its place, if it has one): a copy in memory; in
        scratch, written in a thread (the caller does not change ``value`` after)."""
        place = self.place.get(g)
        if place is None:
            return
        if place == "memory":
            with self._lock:
                self._items[g] = (sketch, value.clone(), maps)
            return
        assert self._dir is not None
        path = self._dir / f"{sorted(self.place).index(g)}.f32"
        self._writes.acquire()  # at most WRITES_AHEAD costs wait to be written
        with self._lock:
            self._items[g] = (sketch, value, maps)  # served from memory until written
            self.scratch_written += 4 * value.numel()
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="rebasin-scratch")
            writer = self._writer
        writer.submit(self._write, g, value, path)

    def _write(self, g: str, value: torch.Tensor, path: Path) -> None:
        """Write a kept cost to its scratch file; it is read from there once written, unless a
        later put has replaced it (writes run one at a time, in order). A write that fails (a
        disk filled since the start) drops the group's kept cost: it is recomputed."""
        try:
            value.detach().cpu().numpy().tofile(path)
            written = True
        except OSError:
            written = False
        finally:
            self._writes.release()
        with self._lock:
            item = self._items.get(g)
            if item is None or item[1] is not value:
                return
            if written:
                self._items[g] = (item[0], path, item[2])
            else:
                del self._items[g]
                self.place.pop(g, None)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(cancel_futures=True)
        with self._lock:
            self._items.clear()
        if self._dir is not None:
            self._finalizer()


def _device_room(device: torch.device) -> int:
    """Bytes a run may hold on a GPU beyond :data:`DEVICE_RESERVE` (0 elsewhere: on the CPU the
    tensors are streamed, never held whole)."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - max(DEVICE_RESERVE, total // 8))


def _free_scratch() -> int:
    try:
        free = shutil.disk_usage(tempfile.gettempdir()).free
    except OSError:
        return 0
    return max(0, free - SCRATCH_RESERVE)


def _is_identity(cols: torch.Tensor) -> bool:
    return bool(torch.equal(cols, torch.arange(len(cols), device=cols.device)))


def param_dot(a: torch.Tensor, b: torch.Tensor, scratch: dict[str, torch.Tensor] | None = None) -> float:
    """``<a, b>`` of one parameter of A and of (permuted) B as the exact objective sums it: in
    float64, a block at a time (:data:`_DOT_BLOCK` on the CPU, where two float64 blocks stay in
    the cache: 1.6x faster than larger ones) in buffers kept in ``scratch`` (fresh ones each
    time fault in new pages). Products of float32 or smaller are exact in float64. Every pass
    that takes it (the input scan, the matching, the write pass) calls this, so the same tensors
    give the same bits."""
    x, y = a.reshape(-1), b.reshape(-1).to(a.device)
    if not x.numel():
        return 0.0
    step = min(x.numel(), _DOT_BLOCK if x.device.type == "cpu" else _CHUNK)
    scratch = {} if scratch is None else scratch
    bx, by = scratch.get("x"), scratch.get("y")
    if bx is None or by is None or bx.numel() < step or bx.device != x.device:
        bx = scratch["x"] = torch.empty(step, dtype=torch.float64, device=x.device)
        by = scratch["y"] = torch.empty(step, dtype=torch.float64, device=x.device)
    total = 0.0
    for i in range(0, x.numel(), step):
        k = min(step, x.numel() - i)
        bx[:k].copy_(x[i : i + k])
        by[:k].copy_(y[i : i + k])
        total += float(torch.dot(bx[:k], by[:k]))
    return total


def add_product(c: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor, scale: float = 1.0) -> None:
    """``c += scale * ra @ rb.T``, a block of columns upcast at a time (half-precision weights
    at the hardware's exact half-precision rate: :func:`exact_half_products`)."""
    with exact_half_products(ra.dtype, c.device):
        for lo, hi in _blocks(ra.shape[1], c.shape[0]):
            c.addmm_(ra[:, lo:hi].float(), rb[:, lo:hi].float().T, alpha=scale)


class GroupProducts:
    """One group's cost with every permutation at the identity, summed from the pairs of
    tensors a pass over both models meets (:meth:`add`, in a fixed order): the input scan takes
    the first cost of weight matching this way, and matching then reads none of it
    (:class:`CostModel`'s ``first``). Members no other group touches are summed apart, as
    matching keeps them."""

    def __init__(self, group: str, n: int, members: Sequence[Member], moving: Collection[Member]):
        self.group = group
        self.n = n
        self._members: dict[str, list[Member]] = {}
        for m in members:
            self._members.setdefault(m.param, []).append(m)
        self._moving = set(moving)
        self.moving = torch.zeros(self.n, self.n, dtype=torch.float32)
        self.fixed = torch.zeros(self.n, self.n, dtype=torch.float32)
        self.covered: set[Member] = set()

    @property
    def params(self) -> set[str]:
        """The parameters whose tensors the group's products need."""
        return set(self._members)

    def add(self, p: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add the products of parameter ``p`` of A and B (as stored)."""
        for m in self._members.get(p, ()):
            target = self.moving if m in self._moving else self.fixed
            add_product(target, _unit_rows(a, m, self.n), _unit_rows(b, m, self.n))
            self.covered.add(m)


def _other_axes(spec: PermutationSpec, m: Member) -> bool:
    return any(e is not None for i, e in enumerate(spec.axes_to_perm[m.param]) if i != m.axis)


def _blocks(cols: int, rows: int) -> Iterator[tuple[int, int]]:
    """Column ranges of at most ``BLOCK_BYTES`` of float32 for a matrix of ``rows`` rows."""
    step = max(1, BLOCK_BYTES // (4 * max(rows, 1)))
    for lo in range(0, cols, step):
        yield lo, min(cols, lo + step)


@contextmanager
def exact_half_products(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Float32 products of half-precision weights at the hardware's half-precision rate, exactly:
    on CUDA, bfloat16/float16 in TF32 (10-bit mantissas hold theirs); on a CPU with bfloat16
    matrix units (oneDNN: AMX, AVX512-BF16), bfloat16 with bfloat16 inputs and float32
    accumulation (their own values: no rounding), about 3x a float32 product. Only for operands
    that are the stored half-precision values themselves, upcast."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        return
    if device.type != "cpu" or dtype != torch.bfloat16 or not _cpu_bf16_products():
        yield
        return
    with _CPU_PRECISION_LOCK:
        matmul = getattr(torch.backends.mkldnn, "matmul")  # noqa: B009 (torch 2.9+, not in older stubs)
        before_cpu = matmul.fp32_precision
        matmul.fp32_precision = "bf16"
        try:
            yield
        finally:
            matmul.fp32_precision = before_cpu


_CPU_PRECISION_LOCK = threading.Lock()


@functools.cache
def _cpu_bf16_products() -> bool:
    """Whether float32 products on the CPU may take bfloat16 inputs (oneDNN with bfloat16
    hardware, and a torch with the precision setting)."""
    try:
        matmul = getattr(torch.backends.mkldnn, "matmul")  # noqa: B009 (torch 2.9+)
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(matmul, "fp32_precision")
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        )
    except (AttributeError, RuntimeError):
        return False


def _unit_rows(t: torch.Tensor, m: Member, n: int) -> torch.Tensor:
    """View ``t`` as one row per unit of the member's group (``n`` units): (n, everything else)."""
    t = t.movedim(m.axis, 0)
    if m.segment or t.shape[0] != n * m.inner:
        t = t[m.start : m.start + n * m.inner]
    if m.inner > 1:
        t = t.reshape(n, m.inner, *t.shape[1:])
    return t.reshape(n, -1)


def sweep_products(
    spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]], weighed: Collection[str]
) -> float:
    """Floating-point operations of one weight-matching sweep: every weighed member's cost-matrix
    product (2 n x numel for a group of n units), from shapes alone."""
    keep = set(weighed)
    return float(
        sum(
            2 * spec.sizes[g] * math.prod(shapes[m.param])
            for g, ms in spec.groups.items()
            for m in ms
            if m.param in keep
        )
    )
