"""Multi-layer perceptron as ``net.0``, ``net.2``, ... (nn.Sequential naming)."""

from __future__ import annotations

from torch import nn

from rebasin.models.registry import register_model


@register_model("mlp")
def mlp(
    in_features: int = 40, hidden: int = 256, depth: int = 3, num_classes: int = 10,
    norm: str = "none",
) -> nn.Module:
    """``depth`` hidden layers of width ``hidden`` with ReLU; ``norm`` is none, bn or ln."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden))
        if norm == "bn":
            layers.append(nn.BatchNorm1d(hidden))
        elif norm == "ln":
            layers.append(nn.LayerNorm(hidden))
        elif norm != "none":
            raise ValueError(f"norm must be none, bn or ln, got {norm!r}")
        layers.append(nn.ReLU())
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
