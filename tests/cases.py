"""Tiny seeded models of every family, built in code (no committed binaries): the cases the
oracle, registry, trace and golden tests run over."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rebasin.models import build_model


class HandNamedMLP(nn.Module):
    """An MLP with hand-named layers (fc1, fc2, ...), and a LayerNorm in the middle."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.norm1 = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 20)
        self.fc3 = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(x)))


@dataclass(frozen=True)
class Case:
    """A model family instance: how to build it and an input batch shape."""

    id: str
    family: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]

    def make(self, seed: int) -> nn.Module:
        """Build with ``seed`` and give BatchNorm layers non-trivial running statistics."""
        torch.manual_seed(seed)
        m = self.build()
        if any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules()):
            m.train()
            with torch.no_grad():
                for _ in range(3):
                    m(torch.randn(32, *self.input_shape[1:]))
        return m.eval()

    def inputs(self, seed: int = 123) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*self.input_shape, generator=g)


CASES = [
    Case(
        "mlp-sequential",
        "mlp",
        lambda: build_model("mlp", in_features=20, hidden=32, depth=3),
        (8, 20),
    ),
    Case(
        "mlp-bn",
        "mlp",
        lambda: build_model("mlp", in_features=20, hidden=24, depth=2, norm="bn"),
        (8, 20),
    ),
    Case("mlp-hand-named", "mlp", HandNamedMLP, (8, 12)),
    Case(
        "vgg-bn-flatten",
        "vgg",
        lambda: build_model("vgg", channels=(8, "M", 16, "M"), image_size=8),
        (4, 1, 8, 8),
    ),
    Case(
        "vgg-nonorm",
        "vgg",
        lambda: build_model("vgg", channels=(6, 10, "M"), norm="none", image_size=6),
        (4, 1, 6, 6),
    ),
    Case(
        "vgg-1d",
        "vgg",
        # 16 channels: at 8, weight matching's descent stops short of the planted permutation on
        # about 3 in 100 planted pairs, whatever the order of its groups (a local optimum)
        lambda: build_model("vgg", channels=(16, "M", 16), conv_dim=1, image_size=16),
        (4, 16),
    ),
    Case("resnet20-bn", "resnet", lambda: build_model("resnet20", width=1), (2, 3, 8, 8)),
    Case("resnet20-ln", "resnet", lambda: build_model("resnet20", width=1, norm="ln"), (2, 3, 8, 8)),
    Case(
        "resnet-bottleneck",
        "resnet",
        lambda: build_model("resnet", blocks=(2, 1), widths=(4, 8), bottleneck=True),
        (2, 3, 8, 8),
    ),
    Case(
        "transformer",
        "transformer",
        lambda: build_model("transformer", seq_len=12, dim=16, depth=2, heads=2),
        (3, 12),
    ),
]
