"""Record a model's torch calls and link the axes each call ties together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rebasin.spec.trace.axes import Axes, Value

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


class Recorder(TorchFunctionMode):
    """Runs the model once, eagerly, recording every torch function call on its tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.u = Axes()
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
        if name == "__setitem__":  # writes into part of a tensor: nothing it touches may move
            for t in _tensors([*args, *kwargs.values()]):
                self.fix_value(self.of(t), "assigned into")
            note = "not understood: item assignment (x[...] = ...)"
            if note not in self.notes:
                self.notes.append(note)
            return out
        if not _has_tensor(out):
            return out
        self.calls += 1
        ins = [self.of(a) if isinstance(a, torch.Tensor) else a for a in args]
        tensors_in = _tensors([*args, *kwargs.values()])  # lists of tensors (cat) included
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
                elif self.u.size[i] != 1:  # a tiled or mismatched dim: neither side may move
                    self.u.fix(i, "broadcast mismatch")
                    if k >= 0:
                        self.u.fix(out[k], "broadcast mismatch")

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
            for d in (*x[2:], *out[2:]):  # positions are tied to the input's layout
                u.fix(d, "spatial positions")
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
            for d in (*x[2:], *o[2:]):
                u.fix(d, "spatial positions")
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
            # legacy empty 1-D tensors (an empty cache) are skipped by cat itself
            parts = [self.of(t) for t in args[0] if not (t.dim() == 1 and t.numel() == 0)]
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
        """Align the dims of a reshape in runs of equal size products: a 1:1 run links; a merge
        (several dims into one) or a split (one into several) records that the one dim is the
        others flattened; anything else stays fixed."""
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
            elif len(ri) == 1:  # one dim split into several (heads x head dims): the same relation
                self.u.merges.append((ri[0], rj))
            else:
                for d in ri + rj:
                    self.u.fix(d, "reshaped across dims")
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


def _tensors(objs: Sequence[Any]) -> list[torch.Tensor]:
    """Every tensor in a call's arguments, one level into lists and tuples."""
    out: list[torch.Tensor] = []
    for o in objs:
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, list | tuple):
            out += [t for t in o if isinstance(t, torch.Tensor)]
    return out


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    return isinstance(obj, tuple | list) and any(isinstance(x, torch.Tensor) for x in obj)
