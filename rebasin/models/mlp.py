"""Multi-layer perceptron with ``net.0``, ``net.2``, ... tensor names (nn.Sequential naming)."""

from __future__ import annotations

import torch
from torch import nn

from rebasin.models.registry import register_model


class MLP(nn.Module):
    """``depth`` hidden layers of width ``hidden`` with ReLU; ``norm`` is none, bn or ln."""

    def __init__(
        self,
        in_features: int = 40,
        hidden: int = 256,
        depth: int = 3,
        num_classes: int = 10,
        norm: str = "none",
    ):
        super().__init__()
        layers: list[nn.Module] = []
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
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.flatten(x, 1))


@register_model("mlp")
def mlp(**kwargs: object) -> nn.Module:
    """A multi-layer perceptron (see :class:`MLP` for arguments)."""
    return MLP(**kwargs)  # type: ignore[arg-type]
