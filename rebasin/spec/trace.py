"""Infer a spec from model code by tracing it and joining tensor axes with union-find.

The model runs once, eagerly, on an example input under a ``TorchFunctionMode`` that records
every torch function call (``F.linear``, ``F.conv2d``, ``F.batch_norm``, tensor methods,
operators ...). Unlike torch.fx's symbolic tracing this follows Python control flow (``if
x.dim() == 3``), and it sees functional calls and modules alike, because modules end in them.
Every axis of every recorded tensor and of every parameter is a node. Operations link the axes that
must move together: elementwise ops and residual adds (with broadcasting), norms, pooling over
other axes, matmul contraction, transposes and permutes, layers' input/output dims and their
parameters. Connected components are the candidate groups; a component touching a model input or
output stays fixed. Reshapes that merge a moving axis with trailing fixed ones (flatten before a
classifier) become block members; concatenation and chunking become segments of a fused axis.
Anything the tracer does not understand fixes every axis it touches, and is listed in the spec's
notes: it is never permuted wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rebasin.errors import SpecError
from rebasin.spec.core import Axis, AxisEntry, Heads, PermutationSpec

# ------------------------------------------------------------------------------------ union-find


@dataclass
class _Axes:
    """Union-find over axis nodes, with the structure found between classes."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)  # node -> reason (resolved on roots later)
    merges: list[tuple[int, list[int]]] = field(default_factory=list)  # out = flatten(ins)
    cats: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)  # whole = cat(pieces)
    heads: list[tuple[int, int, str | None]] = field(default_factory=list)  # node, count, tie
    hints: dict[int, str] = field(default_factory=dict)  # node -> group name

    def new(self, n: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(n))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def link(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # cannot move together: keep both still
            self.fix(ra, "axes of different lengths meet")
            self.fix(rb, "axes of different lengths meet")
        self.parent[rb] = ra

    def fix(self, i: int, reason: str) -> None:
        self.fixed.setdefault(i, reason)

    def is_fixed(self, i: int) -> bool:
        r = self.find(i)
        return any(self.find(j) == r for j in self.fixed)

    def fixed_roots(self) -> set[int]:
        return {self.find(j) for j in self.fixed}


Value = Any  # list[int] for a tensor (one node per dim), tuple of Values, or None


class TraceError(SpecError):
    """The model could not be traced."""


# ------------------------------------------------------------------------------------- the tracer

_ELEMENTWISE = {
    "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__",
    "sub_", "mul", "__mul__", "__rmul__", "__imul__", "mul_", "div", "__truediv__",
    "__rtruediv__", "__itruediv__", "div_", "neg", "__neg__", "pow", "__pow__", "relu", "relu_",
    "gelu", "silu", "sigmoid", "tanh", "elu", "leaky_relu", "softplus", "mish", "hardswish",
    "relu6", "hardtanh", "selu", "celu", "dropout", "dropout1d", "dropout2d", "alpha_dropout",
    "softmax", "log_softmax", "exp", "sqrt", "rsqrt", "abs", "clamp", "clamp_", "where", "erf",
    "square", "sin", "cos", "log", "log1p", "contiguous", "clone", "float", "double", "half",
    "bfloat16", "to", "type_as", "detach", "sign", "maximum", "minimum", "logsigmoid",
    "normalize", "nan_to_num", "masked_fill", "dropout_", "hardsigmoid", "silu_", "gelu_",
}  # fmt: skip
_FRESH = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "arange",
    "tensor", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "eye", "linspace",
    "as_tensor", "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor",
}  # fmt: skip
_RESHAPE = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "view_as", "reshape_as"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "logsumexp", "std", "var"}
_REORDER = {"transpose", "permute", "swapaxes", "swapdims", "movedim", "t"}


def _fname(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "fn" and "boolean_dispatch" in getattr(func, "__qualname__", ""):
        return "max_pool"  # F.max_poolNd / adaptive_max_poolNd dispatch wrappers
    if name == "__get__":  # a tensor property: .T, .mT, .data, ...
        return "." + str(getattr(getattr(func, "__self__", None), "__name__", "?"))
    return str(name)


class _Tracer(TorchFunctionMode):
    """Runs the model once, eagerly, recording every torch function call on its tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.u = _Axes()
        self.nodes: dict[int, list[int]] = {}  # id(tensor) -> its axes' nodes
        self.keep: list[torch.Tensor] = []  # keeps recorded tensors alive: ids stay unique
        self.names: dict[int, list[str]] = {}  # id(parameter or buffer) -> state-dict names
        self.params: dict[int, torch.Tensor] = {}
        for k, v in model.state_dict(keep_vars=True).items():
            self.names.setdefault(id(v), []).append(k)
            self.params[id(v)] = v
        self.param_nodes: dict[int, list[int]] = {}
        self.notes: list[str] = []
        self.calls = 0
        self.failed_at: str | None = None

    # -------------------------------------------------------------------------------- values
    def of(self, t: Any) -> Value:
        """Axis nodes of a tensor argument (parameters get theirs once; a constant made
        outside the recorded calls gets fresh, fixed nodes)."""
        if isinstance(t, torch.Tensor):
            if id(t) in self.nodes:
                return self.nodes[id(t)]
            nodes = [self.u.new(n) for n in t.shape]
            self.nodes[id(t)] = nodes
            self.keep.append(t)
            if id(t) in self.params:
                self.param_nodes[id(t)] = nodes
            else:
                for i in nodes:
                    self.u.fix(i, "a constant")
            return nodes
        if isinstance(t, tuple | list):
            return tuple(self.of(x) for x in t)
        return None

    def bind(self, out: Any) -> Value:
        """Fresh nodes for a call's output tensors."""
        if isinstance(out, torch.Tensor):
            nodes = [self.u.new(n) for n in out.shape]
            self.nodes[id(out)] = nodes
            self.keep.append(out)
            return nodes
        if isinstance(out, tuple | list):
            return tuple(self.bind(x) for x in out)
        return None

    def fix_value(self, v: Value, reason: str) -> None:
        if v is None:
            return
        if isinstance(v, tuple):
            for x in v:
                self.fix_value(x, reason)
            return
        for i in v:
            self.u.fix(i, reason)

    def fix_tree(self, obj: Any, reason: str) -> None:
        """Fix the axes of every tensor inside a (nested) model input or output."""
        if isinstance(obj, torch.Tensor):
            self.fix_value(self.of(obj), reason)
        elif isinstance(obj, tuple | list):
            for x in obj:
                self.fix_tree(x, reason)
        elif isinstance(obj, dict):
            for x in obj.values():
                self.fix_tree(x, reason)
        elif hasattr(obj, "__dataclass_fields__"):
            for k in obj.__dataclass_fields__:
                self.fix_tree(getattr(obj, k, None), reason)

    # -------------------------------------------------------------------------------- record
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = _fname(func)
        try:
            out = func(*args, **kwargs)
        except Exception:
            self.failed_at = name.lstrip(".")
            raise
        if not _has_tensor(out):
            return out
        self.calls += 1
        ins = [self.of(a) if isinstance(a, torch.Tensor) else a for a in args]
        tensors_in = [a for a in args if isinstance(a, torch.Tensor)]
        tensors_in += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        for t in tensors_in:
            self.of(t)
        same = isinstance(out, torch.Tensor) and any(out is t for t in tensors_in)
        prev = self.nodes.get(id(out)) if same else None
        res = self.bind(out)
        if prev is not None:  # an in-place op returns its input: old and new axes are one
            for a, b in zip(prev, res, strict=True):
                self.u.link(a, b)
        try:
            self.dispatch(name, func, ins, args, kwargs, res, tensors_in)
        except (IndexError, TypeError, ValueError, KeyError) as e:
            self.unknown(tensors_in, res, f"{name} ({e})")
        return out

    def unknown(self, tensors_in: Sequence[torch.Tensor], out: Value, what: str) -> None:
        reason = f"not understood: {what}"
        if reason not in self.notes:
            self.notes.append(reason)
        for t in tensors_in:
            self.fix_value(self.of(t), reason)
        self.fix_value(out, reason)

    def broadcast(self, out: list[int], ins: Sequence[Value]) -> None:
        for v in ins:
            if not isinstance(v, list):
                continue
            for j, i in enumerate(v):
                k = j + len(out) - len(v)
                if k >= 0 and self.u.size[i] == self.u.size[out[k]]:
                    if self.u.size[i] > 1:
                        self.u.link(i, out[k])
                elif self.u.size[i] != 1:
                    self.u.fix(i, "broadcast mismatch")

    def dispatch(
        self, name: str, func: Any, ins: list[Any], args: Any, kw: dict[str, Any], out: Value, tin: list[Any]
    ) -> None:
        u = self.u
        x: Any = ins[0] if ins else None

        def arg(i: int, key: str, default: Any = None) -> Any:
            if key in kw:
                v = kw[key]
                return self.of(v) if isinstance(v, torch.Tensor) else v
            return ins[i] if len(ins) > i else default

        if name in (".T", ".mT", ".mH", ".H"):
            n = len(x)
            order = list(range(n))[::-1] if name in (".T", ".H") else [*range(n - 2), n - 1, n - 2]
            for j, d in enumerate(order):
                u.link(x[d], out[j])
        elif name in (".data",):
            self.broadcast(out, [x])
        elif name in _FRESH:
            self.fix_value(out, "a new tensor")
        elif name in _ELEMENTWISE and isinstance(out, list):
            self.broadcast(out, [*ins, *(self.of(v) for v in kw.values() if isinstance(v, torch.Tensor))])
        elif name == "linear":
            w, b = arg(1, "weight"), arg(2, "bias")
            u.link(w[0], out[-1])
            u.link(w[1], x[-1])
            if isinstance(b, list):
                u.link(b[0], out[-1])
            for a, c in zip(x[:-1], out[:-1], strict=True):
                u.link(a, c)
        elif name in ("conv1d", "conv2d"):
            w, b, groups = arg(1, "weight"), arg(2, "bias"), arg(6, "groups", 1)
            u.link(w[0], out[1])
            if groups == 1:
                u.link(w[1], x[1])
            elif groups == u.size[x[1]] == u.size[out[1]]:  # depthwise: channels stay paired
                u.link(x[1], out[1])
                u.fix(w[1], "depthwise")
            else:
                self.unknown(tin, out, "grouped convolution")
                return
            if isinstance(b, list):
                u.link(b[0], out[1])
            u.link(x[0], out[0])
        elif name == "batch_norm":
            self.broadcast(out, [x])
            for i, key in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
                t = arg(i, key)
                if isinstance(t, list):
                    u.link(t[0], out[1])
        elif name == "layer_norm":
            self.broadcast(out, [x])
            for i, key in ((2, "weight"), (3, "bias")):
                t = arg(i, key)
                if isinstance(t, list):
                    for j, n in enumerate(t):
                        u.link(n, out[len(out) - len(t) + j])
        elif name in ("rms_norm",):
            self.broadcast(out, [x])
            t = arg(2, "weight")
            if isinstance(t, list):
                for j, n in enumerate(t):
                    u.link(n, out[len(out) - len(t) + j])
        elif name == "group_norm":
            self.broadcast(out, [x])
            for i, key in ((2, "weight"), (3, "bias")):
                t = arg(i, key)
                if isinstance(t, list):
                    u.link(t[0], out[1])
            u.heads.append((out[1], int(arg(1, "num_groups")), None))
        elif name == "embedding":
            w = arg(1, "weight")
            u.link(w[1], out[-1])
            u.fix(w[0], "embedding rows are token ids")
            for a, c in zip(x, out[:-1], strict=True):
                u.link(a, c)
        elif "pool" in name and isinstance(out, list | tuple):
            o = out if isinstance(out, list) else out[0]
            u.link(x[0], o[0])
            if len(x) == len(o) and len(x) >= 2:
                u.link(x[1], o[1])
            if isinstance(out, tuple):
                self.fix_value(out[1:], "pooling indices")
        elif name == "multi_head_attention_forward":
            self.mha(ins, args, kw, out, tin)
        elif name == "scaled_dot_product_attention":
            q, k, v = ins[:3]
            u.link(q[-1], k[-1])
            u.link(k[-2], v[-2])
            u.link(v[-1], out[-1])
            u.link(q[-2], out[-2])
            self.broadcast(out[:-2], [q[:-2], k[:-2], v[:-2]])
        elif name in ("expand", "expand_as", "broadcast_to", "repeat") and isinstance(out, list):
            self.broadcast(out, [x])  # dims that keep their size link; tiled dims stay fixed
        elif name in _RESHAPE:
            self.reshape(x, out)
        elif name in _REDUCE:
            dim = arg(1, "dim")
            keep = bool(arg(2, "keepdim", False))
            self.reduce(x, out, dim, keep, tin)
        elif name in _REORDER:
            self.reorder(name, x, out, args)
        elif name in ("matmul", "__matmul__", "bmm", "mm"):
            self.matmul(x, ins[1], out)
        elif name == "einsum":
            self.einsum(args, out, tin)
        elif name in ("addmm", "baddbmm"):  # input + mat1 @ mat2 (GPT-2's Conv1D)
            self.matmul(ins[1], ins[2], out)
            self.broadcast(out, [x])
        elif name in ("cat", "concat", "concatenate"):
            parts = [self.of(t) for t in args[0]]
            self.cat(parts, out, arg(1, "dim", 0), tin)
        elif name in ("chunk", "split", "tensor_split"):
            self.split(x, out, arg(2, "dim", 0), tin)
        elif name == "__getitem__":
            self.index(x, args[1], out, tin)
        else:
            self.unknown(tin, out, name)

    def mha(self, ins: list[Any], args: Any, kw: dict[str, Any], out: Value, tin: list[Any]) -> None:
        u = self.u
        names = [
            "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
            "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
            "out_proj_bias",
        ]  # fmt: skip
        a = dict(zip(names, args, strict=False)) | kw
        if a.get("use_separate_proj_weight") or a.get("bias_k") is not None or a["in_proj_weight"] is None:
            self.unknown(tin, out, "multi-head attention with separate projections or bias_k/bias_v")
            return
        q, k, v = (self.of(a[n]) for n in ("query", "key", "value"))
        w = self.of(a["in_proj_weight"])
        e, h = u.size[w[1]], int(a["num_heads"])
        for t in (q, k, v):
            u.link(w[1], t[-1])
        qk, vo = u.new(e), u.new(e)
        base = self.names.get(id(a["in_proj_weight"]), ["attention"])[0].rsplit(".", 1)[0]
        u.heads += [(qk, h, base), (vo, h, base)]
        u.hints.update({qk: f"{base}.qk", vo: f"{base}.vo"})
        u.cats.append((w[0], [(qk, 0), (qk, e), (vo, 2 * e)]))
        if a.get("in_proj_bias") is not None:
            u.link(self.of(a["in_proj_bias"])[0], w[0])
        o = self.of(a["out_proj_weight"])
        u.link(o[1], vo)
        att = out[0]
        u.link(o[0], att[-1])
        if a.get("out_proj_bias") is not None:
            u.link(self.of(a["out_proj_bias"])[0], att[-1])
        self.fix_value(out[1:], "attention weights")
        for p, c in zip(q[:-1], att[:-1], strict=True):
            u.link(p, c)

    # ---------------------------------------------------------------------------- structure
    def reshape(self, x: list[int], out: list[int]) -> None:
        """Align the dims of a reshape in runs of equal size products: a 1:1 run links, a merge
        (several dims into one) becomes a block member, a split or anything else stays fixed."""
        xs = [i for i in x if self.u.size[i] != 1]
        os_ = [i for i in out if self.u.size[i] != 1]
        i = j = 0
        while i < len(xs) and j < len(os_):
            ri, rj = [xs[i]], [os_[j]]
            px, po = self.u.size[xs[i]], self.u.size[os_[j]]
            i, j = i + 1, j + 1
            while px != po:
                if px < po and i < len(xs):
                    px *= self.u.size[xs[i]]
                    ri.append(xs[i])
                    i += 1
                elif po < px and j < len(os_):
                    po *= self.u.size[os_[j]]
                    rj.append(os_[j])
                    j += 1
                else:
                    break
            if px != po:
                for d in ri + xs[i:] + rj + os_[j:]:
                    self.u.fix(d, "reshape")
                return
            if len(ri) == 1 and len(rj) == 1:
                self.u.link(ri[0], rj[0])
            elif len(rj) == 1:  # several dims merged into one (a flatten)
                self.u.merges.append((rj[0], ri))
            else:  # a split: nothing in it may move
                for d in ri + rj:
                    self.u.fix(d, "split by a reshape")
        for d in xs[i:] + os_[j:]:
            self.u.fix(d, "reshape")

    def reduce(self, x: list[int], out: list[int], dim: Any, keep: bool, tin: list[Any]) -> None:
        if dim is None:
            return
        ds = {int(d) % len(x) for d in (dim if isinstance(dim, list | tuple) else [dim])}
        rest = [(j, i) for j, i in enumerate(x) if j not in ds or keep]
        if len(rest) != len(out):
            self.unknown(tin, out, "reduction")
            return
        for (j, a), b in zip(rest, out, strict=True):
            if j not in ds:
                self.u.link(a, b)

    def reorder(self, name: str, x: list[int], out: list[int], args: Any) -> None:
        rest = list(args[1:])
        n = len(x)
        if name == "t":
            order = list(range(n))[::-1]
        elif name == "movedim":
            src, dst = int(rest[0]) % n, int(rest[1]) % n
            order = [d for d in range(n) if d != src]
            order.insert(dst, src)
        elif name in ("transpose", "swapaxes", "swapdims"):
            a, b = (int(d) % n for d in rest[:2])
            order = list(range(n))
            order[a], order[b] = order[b], order[a]
        else:
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], list | tuple) else rest
            order = [int(d) % n for d in dims]
        for j, d in enumerate(order):
            self.u.link(x[d], out[j])

    def einsum(self, args: Any, out: Value, tin: list[Any]) -> None:
        """Every index letter links the dims it labels, in the operands and the output."""
        eq = args[0]
        ops = args[1:] if not (len(args) == 2 and isinstance(args[1], list | tuple)) else list(args[1])
        if not isinstance(eq, str) or "..." in eq or not isinstance(out, list):
            self.unknown(tin, out, "einsum")
            return
        lhs, _, rhs = eq.replace(" ", "").partition("->")
        terms = lhs.split(",")
        if len(terms) != len(ops) or (not rhs and "->" not in eq):
            self.unknown(tin, out, "einsum without an explicit output")
            return
        first: dict[str, int] = {}
        for term, op in zip([*terms, rhs], [*ops, None], strict=True):
            dims = self.of(op) if op is not None else out
            for letter, node in zip(term, dims, strict=True):
                if letter in first:
                    self.u.link(first[letter], node)
                else:
                    first[letter] = node

    def matmul(self, a: list[int], b: list[int], out: list[int]) -> None:
        if len(a) < 2 or len(b) < 2:
            for v in (a, b, out):
                self.fix_value(v, "vector matmul")
            return
        self.u.link(a[-1], b[-2])  # the contraction
        self.u.link(a[-2], out[-2])
        self.u.link(b[-1], out[-1])
        self.broadcast(out[:-2], [a[:-2], b[:-2]])

    def cat(self, parts: list[Any], out: list[int], dim: Any, tin: list[Any]) -> None:
        d = int(dim) % len(out)
        pieces, off = [], 0
        for p in parts:
            if not isinstance(p, list) or len(p) != len(out):
                self.unknown(tin, out, "cat")
                return
            for j in range(len(out)):
                if j != d:
                    self.u.link(p[j], out[j])
            pieces.append((p[d], off))
            off += self.u.size[p[d]]
        self.u.cats.append((out[d], pieces))

    def split(self, x: list[int], out: Value, dim: Any, tin: list[Any]) -> None:
        if not isinstance(out, tuple):
            self.unknown(tin, out, "split")
            return
        d = int(dim) % len(x)
        pieces, off = [], 0
        for p in out:
            for j in range(len(x)):
                if j != d:
                    self.u.link(p[j], x[j])
            pieces.append((p[d], off))
            off += self.u.size[p[d]]
        self.u.cats.append((x[d], pieces))

    def index(self, src: list[int], idx: Any, out: Value, tin: list[Any]) -> None:
        """``x[:, 0]``-style indexing: full slices and None keep dims linked; others stay fixed."""
        items = idx if isinstance(idx, tuple) else (idx,)
        if not isinstance(out, list) or any(isinstance(t, torch.Tensor) for t in items):
            self.unknown(tin, out, "tensor indexing")
            return
        j = k = 0
        for it in items:
            if it is None:
                k += 1
            elif it is Ellipsis:
                skip = len(src) - len([t for t in items if t is not None and t is not Ellipsis])
                for _ in range(skip):
                    self.u.link(src[j], out[k])
                    j, k = j + 1, k + 1
            elif isinstance(it, slice) and it == slice(None):
                self.u.link(src[j], out[k])
                j, k = j + 1, k + 1
            elif isinstance(it, int):
                self.u.fix(src[j], "indexed")
                j += 1
            else:
                self.u.fix(src[j], "sliced")
                self.u.fix(out[k], "sliced")
                j, k = j + 1, k + 1
        while j < len(src) and k < len(out):
            self.u.link(src[j], out[k])
            j, k = j + 1, k + 1


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    return isinstance(obj, tuple | list) and any(isinstance(x, torch.Tensor) for x in obj)


# ------------------------------------------------------------------------------------- assembly


def _resolve(u: _Axes) -> None:
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


def build_spec(tracer: _Tracer, family: str) -> PermutationSpec:
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


# ---------------------------------------------------------------------------------- entry point


def example_input(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """An example input guessed from the first layer (override with a model attribute
    ``example_input``: a tensor, a tuple of tensors, or a callable returning one)."""
    given = getattr(model, "example_input", None)
    if given is not None:
        v = given() if callable(given) else given
        return v if isinstance(v, tuple) else (v,)
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return (torch.randint(0, m.num_embeddings, (2, 8)),)
        if isinstance(m, nn.Linear):
            return (torch.randn(2, m.in_features),)
        if isinstance(m, nn.Conv1d):
            return (torch.randn(2, m.in_channels, 32),)
        if isinstance(m, nn.Conv2d):
            return (torch.randn(2, m.in_channels, 32, 32),)
        if isinstance(m, nn.MultiheadAttention):
            return (torch.randn(2, 8, m.embed_dim),)
    raise TraceError("cannot guess an input shape: give the model an 'example_input' attribute")


def trace_spec(
    model: nn.Module, inputs: Sequence[torch.Tensor] | None = None, name: str = "model"
) -> PermutationSpec:
    """The permutation spec of ``model``, by running it once on ``inputs`` (guessed when None)
    and recording every torch function call on its tensors."""
    model = model.eval()
    args = tuple(inputs) if inputs is not None else example_input(model)
    tracer = _Tracer(model)
    for a in args:
        tracer.fix_tree(a, "model input")
    try:
        with torch.no_grad(), tracer:
            out = model(*args)
    except Exception as e:  # the model's own failure on the example input: one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        where = f" in {tracer.failed_at}" if tracer.failed_at else ""
        raise TraceError(
            f"cannot run model '{name}' on an example input of shape {shapes}{where}: {first}",
            "give the model an 'example_input' attribute, or pass --data",
        ) from None
    tracer.fix_tree(out, "model output")
    if tracer.calls == 0:
        raise TraceError(f"model '{name}' made no torch calls on its input; nothing to trace")
    short = name if "/" not in name else name.rsplit("/", 1)[1]  # a file path: keep its name
    return build_spec(tracer, family=f"traced:{short}")
