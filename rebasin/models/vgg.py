"""VGG-style CNN: ``features.N`` conv/norm stack, flatten, ``classifier.N`` dense layers."""

from __future__ import annotations

import torch
from torch import nn

from rebasin.models.registry import register_model


class VGG(nn.Module):
    """Conv blocks (conv, norm, ReLU, optional max-pool) then a dense classifier on the flattened map."""

    def __init__(
        self,
        channels: tuple[int, ...] = (16, "M", 32, "M"),  # type: ignore[assignment]
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        hidden: int = 64,
        norm: str = "bn",
        conv_dim: int = 2,
    ):
        super().__init__()
        conv = nn.Conv2d if conv_dim == 2 else nn.Conv1d
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for item in channels:
            if item == "M":
                layers.append(nn.MaxPool2d(2) if conv_dim == 2 else nn.MaxPool1d(2))
                size //= 2
                continue
            layers.append(conv(c, int(item), 3, padding=1))
            if norm == "bn":
                layers.append(nn.BatchNorm2d(int(item)) if conv_dim == 2 else nn.BatchNorm1d(int(item)))
            elif norm == "ln":
                layers.append(nn.GroupNorm(1, int(item)))
            elif norm != "none":
                raise ValueError(f"norm must be none, bn or ln, got {norm!r}")
            layers.append(nn.ReLU())
            c = int(item)
        self.features = nn.Sequential(*layers)
        flat = c * size**conv_dim
        self.classifier = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.conv_dim = conv_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == self.conv_dim + 1:  # no channel axis: (N, L) or (N, H, W)
            x = x.unsqueeze(1)
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("vgg")
def vgg(**kwargs: object) -> nn.Module:
    """A small VGG-style CNN (see :class:`VGG` for arguments)."""
    return VGG(**kwargs)  # type: ignore[arg-type]
