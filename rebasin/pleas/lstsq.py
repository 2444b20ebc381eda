"""The least-squares step of PLeaS: layer by layer from the input, each dense or convolutional
layer of the merged model is refitted so that, on the merged model's own inputs at that layer,
it produces the target features (A's and pi(B)'s outputs of the same layer, placed by the
layouts: averaged on merged units, each model's own on its kept units).

The fit is the ridge solution closest to the layer's current weights (the placed average):
``min ||X W - Y||^2 + lam ||W - W0||^2``, ``lam = ridge * mean(diag(X^T X))``. Statistics are
streamed over batches in float64 (``X^T X``, ``X^T Y``, ``Y^2``), so only one layer's inputs
are held at a time. A unit kept from one model never reads the other model's kept units: its
row is solved over the allowed columns only. Where the weights already fit exactly (nothing
merged), the solution is the weights themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rebasin.core.errors import ConfigError
from rebasin.core.types import Progress
from rebasin.data.core import batches
from rebasin.evaluate.metrics import transposed_dense
from rebasin.evaluate.repair import reset_batchnorm
from rebasin.pleas.layout import AxisLayouts, Layout

RIDGE = 1e-4
"""Default ridge, relative to the mean squared input (the inputs' scale)."""


@dataclass(frozen=True)
class LayerFit:
    """One refitted layer: its name, its weight's shape, the examples' rows it was fitted on, and
    the relative residual ``||X W - Y||^2 / ||Y||^2`` before (the placed average) and after."""

    name: str
    shape: tuple[int, ...]
    rows: int
    residual_before: float
    residual_after: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.name,
            "shape": list(self.shape),
            "rows": self.rows,
            "residual_before": self.residual_before,
            "residual_after": self.residual_after,
        }


def _kind(m: nn.Module) -> str | None:
    """How a layer is refitted: dense, conv (zero padding, one group) or transposed dense (Hugging
    Face Conv1D); None: not refitted."""
    if isinstance(m, nn.Linear):
        return "dense"
    if isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros":
        return "conv"
    if transposed_dense(m):
        return "dense_t"
    return None


def layer_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The layers :func:`fit_layers` refits, in the order one forward pass calls them; a layer
    called more than once, or whose weight another module shares (a head tied to the input
    embedding), is left as it is."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
    calls: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, i, o, name=name: calls.append(name))
        for name, m in model.named_modules()
        if _kind(m) is not None
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    shared = {n for n in calls if owners.get(weight_of(model.get_submodule(n)).data_ptr(), 0) > 1}
    return [n for n in dict.fromkeys(calls) if calls.count(n) == 1 and n not in shared]


class _Reached(Exception):
    """Raised by a hook to stop a forward pass once the layer of interest ran."""


def _at(model: nn.Module, name: str, x: torch.Tensor, want_input: bool) -> torch.Tensor:
    """The input (or output) of layer ``name`` on ``x``; the pass stops there."""
    got: list[torch.Tensor] = []

    def hook(mod: nn.Module, inp: tuple[Any, ...], out: torch.Tensor) -> None:
        got.append(inp[0] if want_input else out)
        raise _Reached

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not got:
        raise ConfigError(f"layer '{name}' did not run on the data")
    return got[0].detach()


def _columns(m: nn.Module, kind: str, inp: torch.Tensor) -> torch.Tensor:
    """The layer's input as a design matrix (rows, columns), with a column of ones for a bias."""
    if kind == "conv":
        conv = m
        assert isinstance(conv, nn.Conv1d | nn.Conv2d)
        x4 = inp if isinstance(conv, nn.Conv2d) else inp.unsqueeze(-2)
        k = conv.kernel_size if isinstance(conv, nn.Conv2d) else (1, conv.kernel_size[0])
        s = conv.stride if isinstance(conv, nn.Conv2d) else (1, conv.stride[0])
        d = conv.dilation if isinstance(conv, nn.Conv2d) else (1, conv.dilation[0])
        p = conv.padding if isinstance(conv, nn.Conv2d) else (0, conv.padding[0])
        if isinstance(p, str):
            raise ConfigError(f"layer padding '{p}' is not refitted")
        pad = tuple(int(v) for v in p)
        cols = nn.functional.unfold(x4, k, dilation=d, padding=pad, stride=s)  # (N, C*kh*kw, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = inp.reshape(-1, inp.shape[-1])
    rows = rows.double()
    if bias_of(m) is not None:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    return rows


def weight_of(m: nn.Module) -> torch.Tensor:
    w = getattr(m, "weight", None)
    assert isinstance(w, torch.Tensor)
    return w


def bias_of(m: nn.Module) -> torch.Tensor | None:
    b = getattr(m, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def _matrix(m: nn.Module, kind: str) -> torch.Tensor:
    """The layer's weights (and bias) as (outputs, columns), float64."""
    w = weight_of(m).detach()
    w = w.T if kind == "dense_t" else w.reshape(w.shape[0], -1)
    bias = bias_of(m)
    if bias is not None:
        w = torch.cat([w, bias.detach().reshape(-1, 1)], 1)
    return w.double()


def _set_matrix(m: nn.Module, kind: str, w: torch.Tensor) -> None:
    weight, bias = weight_of(m), bias_of(m)
    with torch.no_grad():
        if bias is not None:
            bias.copy_(w[:, -1].to(bias.dtype))
            w = w[:, :-1]
        w = w.T if kind == "dense_t" else w.reshape(weight.shape)
        weight.copy_(w.to(weight.dtype))


def _sides(item: tuple[Layout, int] | None, size: int, repeat: int) -> torch.Tensor:
    """Each column's (or row's) side: 0 shared or merged, 1 kept from A, 2 kept from B."""
    if item is None:
        return torch.zeros(size, dtype=torch.long)
    lay, inner = item
    return lay.side().repeat_interleave(inner * repeat)


def _target(out_a: torch.Tensor, out_b: torch.Tensor, item: tuple[Layout, int] | None) -> torch.Tensor:
    """The target features (rows, outputs): placed by the output layout, averaged where shared."""
    a, b = out_a.double(), out_b.double()
    if item is None:
        return (a + b) * 0.5
    lay, _ = item
    pad = torch.zeros(len(a), 1, dtype=a.dtype)
    ga = torch.cat([a, pad], 1)[:, torch.where(lay.a < 0, a.shape[1], lay.a)]
    gb = torch.cat([b, pad], 1)[:, torch.where(lay.b < 0, b.shape[1], lay.b)]
    return (ga + gb) * lay.scale().double()


def solve_rows(
    gram: torch.Tensor,
    cross: torch.Tensor,
    w0: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    ridge: float,
) -> torch.Tensor:
    """``w0`` with the rows ``rows`` refitted over the columns ``cols``: the ridge solution of
    ``min ||X W^T - Y||^2 + lam ||W - W0||^2`` from ``gram = X^T X`` and ``cross = X^T Y``."""
    g = gram[cols][:, cols]
    lam = ridge * float(g.diagonal().mean()) if len(cols) else 0.0
    wr = w0[rows][:, cols]
    rhs = cross[cols][:, rows] - g @ wr.T
    a = g + lam * torch.eye(len(cols), dtype=g.dtype)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        delta = torch.cholesky_solve(rhs, chol)
    else:  # singular without a ridge: the least-norm correction
        delta = torch.linalg.lstsq(a, rhs, driver="gelsd").solution
    out = w0.clone()
    out[rows.unsqueeze(1), cols.unsqueeze(0)] = wr + delta.T
    return out


def residual(gram: torch.Tensor, cross: torch.Tensor, yy: torch.Tensor, w: torch.Tensor) -> float:
    """``||X W^T - Y||^2 / ||Y||^2`` from the streamed statistics."""
    err = float(((w @ gram) * w).sum() - 2 * (w * cross.T).sum() + yy.sum())
    return max(err, 0.0) / max(float(yy.sum()), 1e-300)


def fit_layer(
    merged: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    name: str,
    x: torch.Tensor,
    layouts: AxisLayouts,
    out_axes: Mapping[str, int],
    ridge: float = RIDGE,
    batch_size: int = 256,
) -> LayerFit:
    """Refit layer ``name`` of ``merged`` (in place) on the inputs ``x``."""
    m = merged.get_submodule(name)
    kind = _kind(m)
    assert kind is not None
    w0 = _matrix(m, kind)
    d = w0.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64)
    cross = torch.zeros(d, w0.shape[0], dtype=torch.float64)
    yy = torch.zeros(w0.shape[0], dtype=torch.float64)
    weight = f"{name}.weight"
    row = layouts.get(weight, [])
    out_axis = out_axes.get(weight, 0)
    in_axis = 0 if out_axis == 1 else 1
    out_item = row[out_axis] if out_axis < len(row) else None
    in_item = row[in_axis] if in_axis < len(row) else None
    n = 0
    for xb, _ in batches(x, torch.zeros(len(x)), batch_size):
        xm = _columns(m, kind, _at(merged, name, xb, True))
        ma, mb = model_a.get_submodule(name), model_b.get_submodule(name)
        ya = _rows(ma, _at(model_a, name, xb, False))
        yb = _rows(mb, _at(model_b, name, xb, False))
        y = _target(ya, yb, out_item)
        gram += xm.T @ xm
        cross += xm.T @ y
        yy += (y * y).sum(0)
        n += len(xm)
    kernel = weight_of(m)[0, 0].numel() if kind == "conv" else 1
    has_bias = bias_of(m) is not None
    cols_side = _sides(in_item, d - has_bias, kernel)
    if has_bias:
        cols_side = torch.cat([cols_side, torch.zeros(1, dtype=torch.long)])
    rows_side = _sides(out_item, w0.shape[0], 1)
    w = w0
    for side in (0, 1, 2):
        rows = torch.nonzero(rows_side == side).flatten()
        if len(rows) == 0:
            continue
        allowed = (cols_side == 0) | (cols_side == side) if side else torch.ones(d, dtype=torch.bool)
        w = solve_rows(gram, cross, w, rows, torch.nonzero(allowed).flatten(), ridge)
    before, after = residual(gram, cross, yy, w0), residual(gram, cross, yy, w)
    if after > before:  # the ridge step never makes the layer fit worse than where it started
        w, after = w0, before
    _set_matrix(m, kind, w)
    return LayerFit(name, tuple(weight_of(m).shape), n, before, after)


def _rows(m: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A layer's output as (rows, features)."""
    if _kind(m) == "conv":
        return out.movedim(1, -1).reshape(-1, out.shape[1])
    return out.reshape(-1, out.shape[-1])


def fit_layers(
    merged: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    x: torch.Tensor,
    layouts: AxisLayouts,
    out_axes: Mapping[str, int],
    ridge: float = RIDGE,
    batch_size: int = 256,
    reset_bn: bool = True,
    progress: Progress | None = None,
) -> list[LayerFit]:
    """Refit every dense and convolutional layer of ``merged`` in forward order (see the module
    docstring). BatchNorm statistics of the merged model are re-estimated on ``x`` before the
    first layer and after each one (unless ``reset_bn`` is off), so every layer fits the inputs
    the merged model will see."""
    for model in (merged, model_a, model_b):
        model.eval()
    names = layer_order(merged, x[:2])
    has_bn = reset_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in merged.modules())
    if has_bn:
        reset_batchnorm(merged, x)
    fits = []
    for i, name in enumerate(names):
        fits.append(fit_layer(merged, model_a, model_b, name, x, layouts, out_axes, ridge, batch_size))
        if has_bn:
            reset_batchnorm(merged, x)
        if progress:
            progress("least squares", i + 1, len(names))
    return fits
