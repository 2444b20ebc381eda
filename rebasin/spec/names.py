"""Infer a spec from state-dict names and shapes alone (no model code).

Families: ``mlp`` (Sequential or hand-named dense layers), ``vgg`` (conv/BatchNorm feature stacks,
a flatten, dense classifier) and ``resnet`` (torchvision naming: ``conv1``/``bn1`` stem,
``layerN.M.convK``/``bnK`` blocks with ``downsample`` or ``shortcut`` projections, ``fc``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rebasin.checkpoint import natural_key
from rebasin.core.errors import SpecError
from rebasin.spec.core import Axis, AxisEntry, Heads, PermutationSpec
from rebasin.spec.registry import NotThisFamily, Shapes, get_spec_family, list_specs, register_spec

NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")
FIXED_BUFFERS = ("num_batches_tracked",)

# Where a top-level module name usually sits in the forward pass (lower runs first).
_RANK = {
    "input": 0,
    "inp": 0,
    "stem": 0,
    "embed": 0,
    "embedding": 0,
    "features": 1,
    "conv1": 1,
    "bn1": 1,
    "classifier": 3,
    "head": 3,
    "output": 3,
    "out": 3,
    "logits": 3,
    "final": 3,
    "fc": 3,
}


@dataclass
class Module:
    """Tensors sharing a module prefix, classified by their shapes."""

    prefix: str
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        w = self.params.get("weight")
        names = set(self.params)
        if w is not None and len(w) >= 2 and names <= {"weight", "bias"}:
            return "linear" if len(w) == 2 else "conv"
        if names and names <= set(NORM_PARAMS) | set(FIXED_BUFFERS):
            dims = {s[0] for k, s in self.params.items() if k not in FIXED_BUFFERS and len(s) == 1}
            if len(dims) == 1 and all(len(s) == 1 for k, s in self.params.items() if k not in FIXED_BUFFERS):
                return "norm"
        return "unknown"

    @property
    def out_dim(self) -> int:
        if self.kind == "norm":
            return next(s[0] for k, s in self.params.items() if k not in FIXED_BUFFERS)
        return self.params["weight"][0]

    @property
    def in_dim(self) -> int:
        return self.params["weight"][1]

    def name(self, p: str) -> str:
        return f"{self.prefix}.{p}" if self.prefix else p


def split_modules(names: Sequence[str], shapes: Shapes) -> list[Module]:
    """Group tensor names by module prefix, keeping the order of first appearance."""
    mods: dict[str, Module] = {}
    for n in names:
        prefix, _, leaf = n.rpartition(".")
        mods.setdefault(prefix, Module(prefix)).params[leaf] = tuple(shapes[n])
    return list(mods.values())


def _ranked(name: str) -> tuple[int, list[tuple[int, int | str]]]:
    head = name.split(".", 1)[0]
    base = re.sub(r"\d+$", "", head)
    return (_RANK.get(head, _RANK.get(base, 2) if base != head else 2), natural_key(name))


def _norms_after_layers(names: list[str], shapes: Shapes) -> list[str]:
    """Move each norm module right after the layer sharing its number (fc1/norm1, conv2/bn2)."""
    mods = split_modules(names, shapes)
    layer_by_num: dict[tuple[str, str], str] = {}
    for m in mods:
        parent, _, leaf = m.prefix.rpartition(".")
        num = re.search(r"(\d+)$", leaf)
        if num and m.kind in ("linear", "conv"):
            layer_by_num.setdefault((parent, num.group(1)), m.prefix)
    anchor: dict[str, str] = {}
    for m in mods:
        parent, _, leaf = m.prefix.rpartition(".")
        num = re.search(r"(\d+)$", leaf)
        if num and m.kind == "norm" and (parent, num.group(1)) in layer_by_num:
            anchor[m.prefix] = layer_by_num[(parent, num.group(1))]
    if not anchor:
        return names
    order: list[str] = []
    pending = {m.prefix: m for m in mods}
    for m in mods:
        if m.prefix in anchor:
            continue
        order.append(m.prefix)
        order += [n for n, a in anchor.items() if a == m.prefix]
    return [m.name(p) for prefix in order for p in pending[prefix].params]


def candidate_orders(shapes: Shapes, order: Sequence[str] | None) -> list[list[str]]:
    """Tensor orders to try as the forward order: the file's own, then ranked natural sorts."""
    out = []
    if order:
        out.append(list(order))
    ranked = sorted(shapes, key=_ranked)
    for cand in (ranked, _norms_after_layers(ranked, shapes)):
        if cand not in out:
            out.append(cand)
    return out


def _shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


# ---------------------------------------------------------------------------------- resnets

_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")
_SHORTCUTS = ("downsample", "shortcut")
_HEADS = ("fc", "linear", "classifier", "head")


@register_spec(
    "resnet",
    "torchvision-style ResNets: conv1/bn1 stem, layerN.M blocks, fc head",
    typical=r"(^|\.)(conv\d|bn\d|layer\d+|downsample|shortcut|fc)(\.|$)",
)
def resnet_spec(shapes: Shapes, order: Sequence[str] | None = None) -> PermutationSpec:
    """Spec for ResNets with torchvision naming; residual stages tie permutations."""
    if "conv1.weight" not in shapes:
        raise NotThisFamily("no stem 'conv1.weight'")
    blocks: dict[tuple[int, int], list[str]] = {}
    rest: list[str] = []
    for n in shapes:
        m = _BLOCK.match(n)
        if m:
            blocks.setdefault((int(m.group(1)), int(m.group(2))), []).append(n)
        else:
            rest.append(n)
    if not blocks:
        raise NotThisFamily("no residual blocks 'layerN.M.*'")
    axes: dict[str, list[AxisEntry]] = {}
    sizes: dict[str, int] = {}
    used: set[str] = set()

    def conv(name: str, out_group: str, in_group: str | None, in_size: int | None) -> None:
        wname = f"{name}.weight"
        if wname not in shapes:
            raise NotThisFamily(f"missing '{wname}'")
        w = shapes[wname]
        if len(w) < 2:
            raise NotThisFamily(f"'{wname}' {_shape(w)} is not a conv/dense weight")
        if in_size is not None and w[1] != in_size:
            raise NotThisFamily(f"'{wname}' {_shape(w)} takes {w[1]} channels, the stream has {in_size}")
        if out_group in sizes and sizes[out_group] != w[0]:
            raise NotThisFamily(
                f"'{wname}' {_shape(w)} gives {w[0]} channels, the residual stream has "
                f"{sizes[out_group]} (a channel change needs a downsample/shortcut projection)"
            )
        sizes[out_group] = w[0]
        axes[wname] = [Axis(out_group), Axis(in_group) if in_group else None, *[None] * (len(w) - 2)]
        used.add(wname)
        b = f"{name}.bias"
        if b in shapes:
            axes[b] = [Axis(out_group)]
            used.add(b)

    def norm(name: str, group: str) -> None:
        found = False
        for p in NORM_PARAMS:
            n = f"{name}.{p}"
            if n in shapes:
                if tuple(shapes[n]) != (sizes[group],):
                    raise NotThisFamily(f"'{n}' {_shape(shapes[n])} does not match {sizes[group]} channels")
                axes[n] = [Axis(group)]
                used.add(n)
                found = True
        if f"{name}.num_batches_tracked" in shapes:
            used.add(f"{name}.num_batches_tracked")
        if not found and any(k.startswith(name + ".") for k in shapes):
            raise NotThisFamily(f"'{name}' is not a norm layer")

    keys = sorted(blocks)
    first_has_proj = any(
        n.startswith(f"layer{keys[0][0]}.{keys[0][1]}.{s}.") for s in _SHORTCUTS for n in blocks[keys[0]]
    )
    stream = "P_stem" if first_has_proj else f"P_layer{keys[0][0]}"
    conv("conv1", stream, None, None)
    norm("bn1", stream)
    for stage, idx in keys:
        prefix = f"layer{stage}.{idx}"
        names = blocks[(stage, idx)]
        conv_ids = sorted(
            {int(m.group(1)) for n in names if (m := re.match(rf"^{prefix}\.conv(\d+)\.weight$", n))}
        )
        if len(conv_ids) < 2:
            raise NotThisFamily(f"block '{prefix}' has {len(conv_ids)} conv layer(s), expected 2 or 3")
        proj = next((s for s in _SHORTCUTS if f"{prefix}.{s}.0.weight" in shapes), None)
        new_stream = f"P_layer{stage}" if proj else stream
        if proj and new_stream == stream:
            new_stream = f"P_{prefix}"
        prev = stream
        for i, c in enumerate(conv_ids):
            last = i == len(conv_ids) - 1
            g = new_stream if last else f"P_{prefix}.conv{c}"
            conv(f"{prefix}.conv{c}", g, prev, sizes[prev])
            norm(f"{prefix}.bn{c}", g)
            prev = g
        if proj:
            conv(f"{prefix}.{proj}.0", new_stream, stream, sizes[stream])
            norm(f"{prefix}.{proj}.1", new_stream)
        stream = new_stream
        leftover = [n for n in names if n not in used]
        if leftover:
            raise NotThisFamily(f"'{leftover[0]}' {_shape(shapes[leftover[0]])} fits no block layer")
    head = next((h for h in _HEADS if f"{h}.weight" in shapes), None)
    if head is None:
        raise NotThisFamily("no classifier head ('fc.weight')")
    w = shapes[f"{head}.weight"]
    if len(w) != 2 or w[1] != sizes[stream]:
        raise NotThisFamily(f"'{head}.weight' {_shape(w)} does not take the {sizes[stream]}-channel stream")
    axes[f"{head}.weight"] = [None, Axis(stream)]
    used |= {f"{head}.weight", f"{head}.bias"}
    leftover = [n for n in rest if n not in used]
    if leftover:
        raise NotThisFamily(f"'{leftover[0]}' {_shape(shapes[leftover[0]])} fits no ResNet layer")
    return PermutationSpec(axes, sizes, family="resnet")


# ---------------------------------------------------------------------------------- chains


def _chain(shapes: Shapes, order: Sequence[str] | None, family: str, convs: bool) -> PermutationSpec:
    errors = []
    for names in candidate_orders(shapes, order):
        try:
            return _chain_in_order(names, shapes, family, convs)
        except NotThisFamily as e:
            errors.append(str(e))
    raise NotThisFamily(errors[0])


_NOT_CHAIN = re.compile(r"(^|\.)(downsample|shortcut|attn|attention|self_attn|embed_tokens|wte)(\.|$)")


def _chain_in_order(names: Sequence[str], shapes: Shapes, family: str, convs: bool) -> PermutationSpec:
    odd = next((n for n in names if _NOT_CHAIN.search(n)), None)
    if odd:
        raise NotThisFamily(f"'{odd}' belongs to a residual or attention architecture")
    mods = split_modules(names, shapes)
    axes: dict[str, list[AxisEntry]] = {}
    sizes: dict[str, int] = {}
    cur: str | None = None
    cur_size = 0
    prev: Module | None = None
    prev_kind = ""
    layers = 0
    saw_conv = False
    for m in mods:
        kind = m.kind
        if kind == "unknown":
            bad = next(iter(m.params))
            raise NotThisFamily(
                f"'{m.name(bad)}' {_shape(m.params[bad])} is neither a dense/conv layer nor a norm"
            )
        if kind == "norm":
            if cur is None or prev is None:
                raise NotThisFamily(f"norm '{m.prefix}' comes before any layer")
            if m.out_dim != cur_size:
                raise NotThisFamily(
                    f"norm '{m.prefix}' has {m.out_dim} features, '{prev.prefix}' gives {cur_size}"
                )
            for p, s in m.params.items():
                if p not in FIXED_BUFFERS:
                    axes[m.name(p)] = [Axis(cur)] + [None] * (len(s) - 1)
            continue
        if kind == "conv":
            if not convs:
                raise NotThisFamily(f"'{m.name('weight')}' is a convolution")
            saw_conv = True
        w = m.params["weight"]
        in_entry: AxisEntry = None
        if cur is not None and prev is not None:
            if w[1] == cur_size:
                in_entry = Axis(cur)
            elif kind == "linear" and prev_kind == "conv" and w[1] % cur_size == 0:
                in_entry = Axis(cur, w[1] // cur_size)  # flatten: channels x spatial
            else:
                raise NotThisFamily(
                    f"'{m.name('weight')}' {_shape(w)} takes {w[1]} inputs but "
                    f"'{prev.prefix}' gives {cur_size}"
                )
        group = f"P_{m.prefix}" if m.prefix else "P_root"
        sizes[group] = w[0]
        axes[m.name("weight")] = [Axis(group), in_entry] + [None] * (len(w) - 2)
        if "bias" in m.params:
            if m.params["bias"] != (w[0],):
                raise NotThisFamily(f"'{m.name('bias')}' does not match '{m.name('weight')}'")
            axes[m.name("bias")] = [Axis(group)]
        cur, cur_size, prev, prev_kind = group, w[0], m, kind
        layers += 1
    if layers < 2:
        raise NotThisFamily(f"found {layers} dense/conv layer(s); a {family} needs at least 2")
    if convs and not saw_conv:
        raise NotThisFamily("no convolution found")
    # the last layer's outputs are the model's outputs: they stay fixed
    assert cur is not None
    del sizes[cur]
    for p, es in axes.items():
        axes[p] = [None if isinstance(e, Axis) and e.group == cur else e for e in es]
    return PermutationSpec(axes, sizes, family=family)


@register_spec(
    "mlp",
    "dense layers in a chain (nn.Sequential or fc1/fc2/... names), optional norms",
    typical=r"(^|\.)(fc\d*|linear\d*|dense\d*|layers?|net|mlp|\d+)(\.|$)",
)
def mlp_spec(shapes: Shapes, order: Sequence[str] | None = None) -> PermutationSpec:
    """Spec for a chain of dense layers."""
    return _chain(shapes, order, "mlp", convs=False)


@register_spec(
    "vgg",
    "conv/norm feature stack, flatten, dense classifier (VGG-style CNNs)",
    typical=r"(^|\.)(features|classifier|conv\d*|bn\d*|\d+)(\.|$)",
)
def vgg_spec(shapes: Shapes, order: Sequence[str] | None = None) -> PermutationSpec:
    """Spec for a plain CNN: convolutions (with norms), a flatten, dense layers."""
    return _chain(shapes, order, "vgg", convs=True)


# ---------------------------------------------------------------------------------- entry point


def shapes_of(state: Mapping[str, torch.Tensor] | Shapes) -> dict[str, tuple[int, ...]]:
    """Shapes of a state dict (or pass shapes through)."""
    out = {}
    for k, v in state.items():
        out[k] = tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
    return out


def infer_spec(
    state: Mapping[str, torch.Tensor] | Shapes,
    family: str = "auto",
    *,
    order: Sequence[str] | None = None,
    source: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> PermutationSpec:
    """Infer the permutation spec of a state dict from its names and shapes.

    ``family`` is ``auto`` (try every registered family) or a registered name. ``order`` is the
    forward order of tensors if known (e.g. from a .pt file). ``config`` is a Hugging Face
    config.json (head counts for attention). Raises SpecError naming the closest families and
    why they did not fit.
    """
    shapes = {k: v for k, v in shapes_of(state).items() if len(v) and math.prod(v)}
    """Scalars and empty tensors carry no units: no group moves them, and they never decide a
    family (nor size a group)."""
    if order is None and state and isinstance(next(iter(state.values())), torch.Tensor):
        order = list(state)  # an in-memory state dict keeps the module order
    if order is not None:
        order = [k for k in order if k in shapes]
    if not shapes:
        raise SpecError("no tensor with units to permute (only scalars and empty tensors)", source=source)
    fams = list_specs() if family == "auto" else [get_spec_family(family)]
    reasons = []
    for fam in fams:
        try:
            return fam.build(shapes, order, config)
        except NotThisFamily as e:
            reasons.append((fam.name, str(e)))
    if family != "auto":
        raise SpecError(
            f"not a '{family}' checkpoint: {reasons[0][1]}",
            "pick another family, write a spec file (docs/writing-a-spec.md), or pass --model",
            source=source,
        )
    mods = split_modules(sorted(shapes, key=natural_key), shapes)
    kinds: dict[str, int] = {}
    for m in mods:
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    seen = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    close = closest_families(shapes)[:2]
    why = dict(reasons)
    near = "; ".join(f"{name} ({score:.0%} of names fit; {why.get(name, '')})" for name, score in close)
    raise SpecError(
        f"unrecognized architecture ({len(shapes)} tensors: {seen}); closest families: {near}",
        "write a spec file and pass --spec spec.yaml (see docs/writing-a-spec.md), or pass "
        "--model MODULE:FACTORY to trace the model",
        source=source,
    )


def closest_families(shapes: Shapes) -> list[tuple[str, float]]:
    """Registered families ranked by the share of tensor names that look like theirs."""
    names = list(shapes)
    out = []
    for fam in list_specs():
        rx = fam.typical
        if rx is None or not names:
            continue
        hit = sum(1 for n in names if re.search(rx, n))
        out.append((fam.name, hit / len(names)))
    return sorted(out, key=lambda t: -t[1])


# ---------------------------------------------------------------------------------- transformer

_TBLOCK = re.compile(r"^blocks\.(\d+)\.")


@register_spec(
    "transformer",
    "rebasin's small pre-LN transformer: embed, pos, blocks.N.{ln1,attn,ln2,mlp}, ln_f, head",
    typical=r"(^|\.)(embed|pos|blocks|ln\d|ln_f|attn|qkv|proj|mlp|head)(\.|$)",
)
def transformer_spec(
    shapes: Shapes, order: Sequence[str] | None = None, config: Mapping[str, Any] | None = None
) -> PermutationSpec:
    """One residual-stream group for the whole network and one group per MLP hidden layer; with
    the head count (``config["num_attention_heads"]``, which rebasin reads from the checkpoint's
    recorded architecture) also the attention heads and the q/k and v/o dims within them."""
    need = ("embed.weight", "pos", "ln_f.weight", "head.weight")
    missing = [n for n in need if n not in shapes]
    if missing:
        raise NotThisFamily(f"no '{missing[0]}'")
    d = shapes["embed.weight"][0]
    res = "P_residual"
    axes: dict[str, list[AxisEntry]] = {
        "embed.weight": [Axis(res), None],
        "pos": [None, None, Axis(res)],
        "ln_f.weight": [Axis(res)],
        "head.weight": [None, Axis(res)],
    }
    sizes = {res: d}
    heads: dict[str, Heads] = {}
    for opt in ("embed.bias", "ln_f.bias"):
        if opt in shapes:
            axes[opt] = [Axis(res)]
    blocks = sorted({int(m.group(1)) for n in shapes if (m := _TBLOCK.match(n))})
    if not blocks:
        raise NotThisFamily("no 'blocks.N.*'")
    for i in blocks:
        p = f"blocks.{i}"
        for ln in ("ln1", "ln2"):
            axes[f"{p}.{ln}.weight"] = [Axis(res)]
            axes[f"{p}.{ln}.bias"] = [Axis(res)]
        inner = shapes.get(f"{p}.attn.qkv.weight", (3 * d,))[0] // 3  # heads x head dim (a PLeaS
        # merge may widen the residual stream and leave the heads as they were)
        att = _transformer_attention(i, inner, (config or {}).get("num_attention_heads"), sizes, heads)
        axes[f"{p}.attn.qkv.weight"] = [att[0], Axis(res)]
        axes[f"{p}.attn.proj.weight"] = [Axis(res), att[1]]
        if att[0] is not None and f"{p}.attn.qkv.bias" in shapes:
            axes[f"{p}.attn.qkv.bias"] = [att[0]]
        axes[f"{p}.attn.proj.bias"] = [Axis(res)]
        hid = f"P_{p}.mlp"
        sizes[hid] = shapes.get(f"{p}.mlp.fc1.weight", (0,))[0]
        axes[f"{p}.mlp.fc1.weight"] = [Axis(hid), Axis(res)]
        axes[f"{p}.mlp.fc1.bias"] = [Axis(hid)]
        axes[f"{p}.mlp.fc2.weight"] = [Axis(res), Axis(hid)]
        axes[f"{p}.mlp.fc2.bias"] = [Axis(res)]
    known = set(axes) | {"head.bias", *(f"blocks.{i}.attn.qkv.bias" for i in blocks)}
    extra = [n for n in shapes if n not in known]
    if extra:
        raise NotThisFamily(f"'{extra[0]}' {_shape(shapes[extra[0]])} fits no transformer layer")
    notes = [] if heads else ["attention stays fixed: the head count is unknown"]
    spec = PermutationSpec(axes, sizes, family="transformer", heads=heads, notes=notes)
    problems = spec.problems(shapes)
    if problems:
        raise NotThisFamily(problems[0])
    return spec


def _transformer_attention(
    layer: int, d: int, n_heads: Any, sizes: dict[str, int], heads: dict[str, Heads]
) -> tuple[AxisEntry, AxisEntry]:
    """(qkv output entry: q | k | v segments, proj input entry) of one block, or fixed ones."""
    if not isinstance(n_heads, int) or n_heads < 1 or d % n_heads:
        return None, None
    tie = f"P_blocks.{layer}.attn"
    qk, vo = f"{tie}.qk", f"{tie}.vo"
    sizes[qk] = sizes[vo] = d
    heads[qk] = heads[vo] = Heads(n_heads, tie)
    return (Axis(qk, 1, 0), Axis(qk, 1, d), Axis(vo, 1, 2 * d)), Axis(vo)
