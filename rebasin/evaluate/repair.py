"""Statistics repair after interpolation (Jordan et al., "REPAIR", 2022).

* BatchNorm reset: recompute every BatchNorm's running statistics of the merged model on training
  data (exact average: momentum=None, one pass).
* REPAIR: make each hidden channel's mean and standard deviation equal to the interpolation of the
  endpoints' (measured on training data), by an affine correction folded into the module's own
  weight and bias (the architecture is unchanged). Targets are the norm layers where the model has
  them, else every conv/dense layer but the last. Modules are corrected in forward order, each
  measured after the corrections before it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rebasin.data.core import batches
from rebasin.evaluate.metrics import channel_rows

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def reset_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> None:
    """Recompute BatchNorm running statistics on ``x`` as an exact average over one pass."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    device = next(model.parameters()).device
    for xb, _ in batches(x, torch.zeros(len(x)), batch_size):
        model(xb.to(device))
    for bn, mom in zip(bns, saved, strict=True):
        bn.momentum = mom
    model.eval()


def repair_targets(model: nn.Module) -> list[str]:
    """Names of the modules REPAIR corrects, in registration (forward) order."""
    named = list(model.named_modules())
    norms = [n for n, m in named if isinstance(m, NORMS) and getattr(m, "weight", None) is not None]
    if norms:
        return norms
    layers = [n for n, m in named if isinstance(m, LAYERS) and getattr(m, "bias", None) is not None]
    return layers[:-1]


@torch.no_grad()
def channel_stats(model: nn.Module, names: Iterable[str], x: torch.Tensor, batch_size: int = 500) -> Stats:
    """Per-channel mean and std of the named modules' outputs on ``x`` (float64 streaming)."""
    mods = dict(model.named_modules())
    sums: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in names:
        m = mods[name]

        def hook(mod: nn.Module, _inp: object, out: torch.Tensor, name: str = name) -> None:
            o = channel_rows(mod, out).double()
            s = sums.setdefault(
                name,
                [
                    torch.zeros(o.shape[1], dtype=torch.float64),
                    torch.zeros(o.shape[1], dtype=torch.float64),
                    torch.zeros((), dtype=torch.float64),
                ],
            )
            s[0] += o.sum(0).cpu()
            s[1] += (o * o).sum(0).cpu()
            s[2] += o.shape[0]

        handles.append(m.register_forward_hook(hook))
    model.eval()
    device = next(model.parameters()).device
    try:
        for xb, _ in batches(x, torch.zeros(len(x)), batch_size):
            model(xb.to(device))
    finally:
        for h in handles:
            h.remove()
    out: Stats = {}
    for name, (s1, s2, n) in sums.items():
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        out[name] = (mean, var.sqrt())
    return out


@torch.no_grad()
def repair(
    model: nn.Module,
    stats_a: Stats,
    stats_b: Stats,
    alpha: float,
    x: torch.Tensor,
    batch_size: int = 500,
    eps: float = 1e-5,
) -> None:
    """Correct ``model`` (the interpolation at ``alpha``) so every target channel has the
    interpolated endpoint mean/std. BatchNorm statistics are reset first."""
    reset_batchnorm(model, x, batch_size)
    mods = dict(model.named_modules())
    for name in repair_targets(model):
        if name not in stats_a or name not in stats_b:
            continue
        mean_a, std_a = stats_a[name]
        mean_b, std_b = stats_b[name]
        mean_t = (1 - alpha) * mean_a + alpha * mean_b
        std_t = (1 - alpha) * std_a + alpha * std_b
        mean_m, std_m = channel_stats(model, [name], x, batch_size)[name]
        scale = std_t / (std_m + eps)
        m = mods[name]
        w = m.weight
        shape = (-1,) + (1,) * (w.dim() - 1)
        w.mul_(scale.to(w.dtype).to(w.device).view(shape))
        if getattr(m, "bias", None) is not None:
            shift = (m.bias.double().cpu() - mean_m) * scale + mean_t
            m.bias.copy_(shift.to(m.bias.dtype))
