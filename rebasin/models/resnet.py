"""ResNets with torchvision naming (``conv1``/``bn1`` stem, ``layerN.M`` blocks, ``downsample``, ``fc``)."""

from __future__ import annotations

import torch
from torch import nn

from rebasin.models.registry import register_model


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "ln":
        return nn.GroupNorm(1, c)
    raise ValueError(f"norm must be bn or ln, got {kind!r}")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), _norm(norm, planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + skip)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: str):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = _norm(norm, out)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), _norm(norm, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + skip)


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks, global average pool, ``fc``."""

    def __init__(
        self,
        blocks: tuple[int, ...] = (3, 3, 3),
        widths: tuple[int, ...] = (16, 32, 64),
        in_channels: int = 3,
        num_classes: int = 10,
        norm: str = "bn",
        bottleneck: bool = False,
    ):
        super().__init__()
        block = Bottleneck if bottleneck else BasicBlock
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = _norm(norm, widths[0])
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(cin, w, stride, norm))
                cin = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = torch.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model("resnet20")
def resnet20(width: int = 1, in_channels: int = 3, num_classes: int = 10, norm: str = "bn") -> nn.Module:
    """ResNet-20 (3 stages x 3 basic blocks, widths 16/32/64 times ``width``)."""
    return ResNet((3, 3, 3), tuple(16 * width * k for k in (1, 2, 4)), in_channels, num_classes, norm)


@register_model("resnet")
def resnet(
    blocks: tuple[int, ...] = (2, 2),
    widths: tuple[int, ...] = (8, 16),
    in_channels: int = 3,
    num_classes: int = 10,
    norm: str = "bn",
    bottleneck: bool = False,
) -> nn.Module:
    """A configurable ResNet (basic or bottleneck blocks)."""
    return ResNet(tuple(blocks), tuple(widths), in_channels, num_classes, norm, bottleneck)
