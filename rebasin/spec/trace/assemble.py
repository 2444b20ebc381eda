"""Turn the linked axes into a PermutationSpec: resolve what must stay fixed, name the groups."""

from __future__ import annotations

import math

from rebasin.spec.core import Axis, AxisEntry, Heads, PermutationSpec
from rebasin.spec.trace.axes import Axes
from rebasin.spec.trace.recorder import Recorder


def _resolve(u: Axes) -> None:
    """Propagate fixedness through merges and cats until nothing changes."""
    changed = True
    while changed:
        changed = False
        fixed = u.fixed_roots()

        def fix(i: int, reason: str, fixed: set[int] = fixed) -> None:
            nonlocal changed
            if u.find(i) not in fixed:
                u.fix(i, reason)
                fixed.add(u.find(i))
                changed = True

        for out, ins in u.merges:
            moving = [i for i in ins if u.find(i) not in fixed]
            lead = ins[0]
            if len(moving) > 1 or (moving and moving[0] != lead) or u.find(out) in [u.find(i) for i in ins]:
                for i in [out, *ins]:
                    fix(i, "reshaped together with another moving axis")
            elif u.find(out) in fixed or u.find(lead) in fixed:
                fix(out, "flattened into a fixed axis")
                fix(lead, "flattened into a fixed axis")
        for whole, pieces in u.cats:
            if u.find(whole) in fixed or any(u.find(whole) == u.find(p) for p, _ in pieces):
                for p, _ in pieces:
                    fix(p, "concatenated into a fixed axis")
                fix(whole, "concatenated into a fixed axis")


def build_spec(tracer: Recorder, family: str) -> PermutationSpec:
    u = tracer.u
    # axes holding no parameter (batch, positions, spatial dims) have nothing to permute
    with_params = {u.find(i) for nodes in tracer.param_nodes.values() for i in nodes}
    special = {u.find(o) for o, _ in u.merges} | {u.find(i) for i, _, _ in u.heads}
    special |= {u.find(w) for w, _ in u.cats} | {u.find(p) for _, ps in u.cats for p, _ in ps}
    for r in {u.find(i) for i in range(len(u.parent))}:
        if r not in with_params and r not in special:
            u.fix(r, "holds no parameter")
    _resolve(u)
    fixed = u.fixed_roots()
    group_of: dict[int, str] = {}
    sizes: dict[str, int] = {}

    # name groups after the first parameter axis in them (state-dict order)
    order = {k: i for i, k in enumerate(tracer.model.state_dict())}
    hints = {u.find(i): h for i, h in u.hints.items()}
    members: dict[int, list[tuple[str, int]]] = {}
    for key, nodes in tracer.param_nodes.items():
        for ax, i in enumerate(nodes):
            for name in tracer.names.get(key, []):
                members.setdefault(u.find(i), []).append((name, ax))
    roots_of_merge = {u.find(o) for o, _ in u.merges}
    roots_of_cat = {u.find(w) for w, _ in u.cats}
    structural = roots_of_merge | roots_of_cat
    heads_nodes = {u.find(i) for i, _, _ in u.heads}
    param_node_set = {i for nodes in tracer.param_nodes.values() for i in nodes}
    carries = {u.find(i) for i in range(len(u.parent)) if i not in param_node_set}
    ndim = {n: t.dim() for k, t in tracer.params.items() for n in tracer.names.get(k, [])}
    # pieces of a fused axis (q | k | v chunks) are groups too, named after the fused tensor
    piece_names: dict[int, str] = {}
    for whole, pieces in u.cats:
        w = u.find(whole)
        if w in fixed or w not in members:
            continue
        base = min(members[w], key=lambda m: order.get(m[0], 1 << 30))[0].rsplit(".", 1)[0]
        for k, (p, _) in enumerate(pieces):
            piece_names.setdefault(u.find(p), f"{base}.part{k}")
    roots = []
    for r in sorted({u.find(i) for i in range(len(u.parent))}):
        if r in fixed or r in structural or u.size[r] < 2:
            continue
        if r not in heads_nodes and r not in piece_names and (r not in members or r not in carries):
            continue  # parameter-only axes (conv kernels) are not hidden units
        roots.append(r)

    def first(r: int) -> int:
        return min((order.get(n, 1 << 30) for n, _ in members.get(r, [])), default=1 << 30)

    # a residual stream has several writers (layers whose outputs are added into it)
    def is_stream(r: int) -> bool:  # several writers and a norm on it
        ms = members.get(r, [])
        writers = sum(1 for n, ax in ms if ax == 0 and ndim[n] >= 2)
        return writers > 1 and any(ndim[n] == 1 and n.endswith(".weight") for n, _ in ms)

    streams = [r for r in roots if is_stream(r)]
    for k, r in enumerate(sorted(streams, key=first)):
        group_of[r] = "residual" if k == 0 else f"residual.{k + 1}"
    for r in roots:
        if r not in group_of:
            hint = hints.get(r) or (piece_names.get(r) if r not in members else None)
            taken = sizes | {g: 0 for g in group_of.values()}
            group_of[r] = _group_name(members.get(r, []), taken, order, hint)
    for r in roots:
        sizes[group_of[r]] = u.size[r]

    def entry_for(root: int) -> AxisEntry:
        if root in fixed:
            return None
        if root in group_of:
            return Axis(group_of[root])
        for out, ins in u.merges:
            if u.find(out) == root:
                lead = u.find(ins[0])
                inner = math.prod(u.size[i] for i in ins[1:])
                if lead in group_of:
                    return Axis(group_of[lead], inner)
                return None
        for whole, pieces in u.cats:
            if u.find(whole) == root:
                segs = tuple(Axis(group_of[u.find(p)], 1, off) for p, off in pieces if u.find(p) in group_of)
                return segs or None
        return None

    axes: dict[str, list[AxisEntry]] = {}
    for key, nodes in tracer.param_nodes.items():
        entries = [entry_for(u.find(i)) for i in nodes]
        for name in tracer.names.get(key, []):
            axes[name] = list(entries)
    used = {a.group for es in axes.values() for e in es for a in ((e,) if isinstance(e, Axis) else e or ())}
    sizes = {g: n for g, n in sizes.items() if g in used}
    heads: dict[str, Heads] = {}
    notes = list(tracer.notes)
    for i, count, tie in u.heads:
        g = group_of.get(u.find(i))
        if g is None or g not in sizes:
            continue
        if g in heads and heads[g].count != count:
            notes.append(f"group '{g}' needs two head structures; it stays fixed")
            sizes.pop(g)
            continue
        heads[g] = Heads(count, tie)
    if set(heads) != {g for g in heads if g in sizes}:
        heads = {g: h for g, h in heads.items() if g in sizes}
    axes = {p: [e if _entry_groups(e) <= set(sizes) else None for e in es] for p, es in axes.items()}
    return PermutationSpec(axes, sizes, family=family, heads=heads, notes=notes)


def _entry_groups(e: AxisEntry) -> set[str]:
    if e is None:
        return set()
    return {a.group for a in ((e,) if isinstance(e, Axis) else e)}


def _group_name(
    members: list[tuple[str, int]], taken: dict[str, int], order: dict[str, int], hint: str | None
) -> str:
    """``fc1`` for the outputs of layer fc1; ``NAME.in`` where only an input axis is known."""
    if hint:
        base = hint
    elif members:
        name, ax = min(members, key=lambda m: (m[1] != 0, order.get(m[0], 1 << 30)))
        base = name.rsplit(".", 1)[0] if "." in name else name
        base = base if ax == 0 else f"{base}.in{ax}"
    else:
        base = "hidden"
    out, n = base, 2
    while out in taken:
        out, n = f"{base}.{n}", n + 1
    return out
