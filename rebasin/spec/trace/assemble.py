"""Turn the linked axes into a PermutationSpec: resolve what must stay fixed, name the groups."""

from __future__ import annotations

import math

from rebasin.spec.core import Axis, AxisEntry, Heads, PermutationSpec, parts
from rebasin.spec.trace.axes import Axes
from rebasin.spec.trace.recorder import Recorder


def _resolve(u: Axes, free: set[int]) -> dict[int, tuple[int, int]]:
    """Propagate fixedness through merges and cats until nothing changes; return the composite
    axes (flattened heads x head dims, both moving), out root -> (heads root, dims root).

    A flattened axis may move as its leading dim in blocks (the rest fixed: a flatten before a
    classifier, heads moving whole), or, when it is exactly two parameter-free moving dims
    (``free``: heads and their dims, as attention code splits them), as heads with moves within
    each head. Anything else fixes every dim involved."""

    def composite(ins: list[int], fixed: set[int]) -> bool:
        return len(ins) == 2 and all(u.find(i) in free and u.find(i) not in fixed for i in ins)

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
            if u.find(out) in [u.find(i) for i in ins] or u.find(ins[0]) == u.find(ins[-1]):
                for i in [out, *ins]:
                    fix(i, "reshaped into itself")
            elif composite(ins, fixed):
                if u.find(out) in fixed:
                    for i in ins:
                        fix(i, "flattened into a fixed axis")
            elif len(moving) > 1 or (moving and moving[0] != lead):
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
    # every flatten of the same heads and dims is the same axis (q and k, v and o's input)
    fixed = u.fixed_roots()
    first: dict[tuple[int, int], int] = {}
    for out, ins in u.merges:
        if composite(ins, fixed) and u.find(out) not in fixed:
            key = (u.find(ins[0]), u.find(ins[1]))
            if key in first:
                u.link(first[key], out)
            else:
                first[key] = out
    return {u.find(o): key for key, o in first.items()}


def _free_split_dims(u: Axes, with_params: set[int]) -> set[int]:
    """Parameter-free dims that may move through the axis they were split from: attention's
    heads (h) and head dims (d), as code views a projection as (h, d). Only the plain pattern
    qualifies: every such merge has two parameter-free dims; a head dim always pairs with the
    same heads; heads never pair with other heads' dims in second place; neither is itself a
    flattened axis. Anything subtler (grouped-query repeats, nested reshapes) stays fixed."""
    outs = {u.find(o) for o, _ in u.merges}
    pairs = [(u.find(ins[0]), u.find(ins[1])) for _, ins in u.merges if len(ins) == 2]
    candidates = [
        (h, d)
        for h, d in pairs
        if h not in with_params and d not in with_params and h not in outs and d not in outs
    ]
    partner: dict[int, set[int]] = {}
    for h, d in pairs:
        partner.setdefault(d, set()).add(h)
    seconds = {d for _, d in pairs}
    free = set()
    for h, d in candidates:
        if partner[d] == {h} and h not in seconds:
            free |= {h, d}
    return free


def build_spec(tracer: Recorder, family: str) -> PermutationSpec:
    u = tracer.u
    # axes holding no parameter (batch, positions, spatial dims) have nothing to permute
    with_params = {u.find(i) for nodes in tracer.param_nodes.values() for i in nodes}
    special = {u.find(o) for o, _ in u.merges} | {u.find(i) for i, _, _ in u.heads}
    special |= {u.find(w) for w, _ in u.cats} | {u.find(p) for _, ps in u.cats for p, _ in ps}
    free = _free_split_dims(u, with_params)
    for r in {u.find(i) for i in range(len(u.parent))}:
        if r not in with_params and r not in special and r not in free:
            u.fix(r, "holds no parameter")
    composites = _resolve(u, free)
    fixed = u.fixed_roots()
    # head counts: a composite's heads, and a parameter-free lead moving in blocks (whole heads)
    head_of: dict[int, int] = {c: h for c, (h, _) in composites.items()}
    lead_out: dict[int, int] = {}  # a heads-in-blocks lead -> the axis it moves in blocks
    for out, ins in u.merges:
        lead = u.find(ins[0])
        if lead in free and lead not in fixed and u.find(out) not in composites:
            head_of.setdefault(lead, lead)
            lead_out.setdefault(lead, u.find(out))
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
        if r in fixed or u.size[r] < 2:
            continue
        if r in head_of:  # attention heads (and heads x head dims) found through reshapes
            roots.append(r)
            continue
        if r in structural:
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
            if hint is None and r in lead_out and lead_out[r] in piece_names:
                hint = f"{piece_names[lead_out[r]]}.heads"
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
                segs = []
                for p, off in pieces:
                    e = entry_for(u.find(p)) if u.find(p) != root else None
                    if isinstance(e, Axis):  # a piece that is a group, or heads in blocks
                        segs.append(Axis(e.group, e.inner, off))
                return tuple(segs) or None
        return None

    axes: dict[str, list[AxisEntry]] = {}
    for key, nodes in tracer.param_nodes.items():
        entries = [entry_for(u.find(i)) for i in nodes]
        for name in tracer.names.get(key, []):
            axes[name] = list(entries)
    used = {a.group for es in axes.values() for e in es for a in parts(e)}
    sizes = {g: n for g, n in sizes.items() if g in used}
    heads: dict[str, Heads] = {}
    notes = list(tracer.notes)
    dropped = []
    ties: dict[int, str] = {}
    for r, h in sorted(head_of.items()):
        g = group_of.get(r)
        if g in sizes:
            heads[g] = Heads(u.size[h], ties.setdefault(h, f"{g}.heads"))
    for i, count, tie in u.heads:
        g = group_of.get(u.find(i))
        if g not in sizes or g in dropped:
            continue
        if g in heads and heads[g].count != count:
            notes.append(f"group '{g}' needs two head structures; it stays fixed")
            dropped.append(g)
            continue
        heads[g] = Heads(count, tie)
    spec = PermutationSpec(axes, sizes, family=family, heads=heads, notes=notes)
    return spec.without(dropped) if dropped else spec


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
