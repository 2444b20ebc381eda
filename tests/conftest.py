"""Shared fixtures: tiny seeded models of every family, built in code (no committed binaries)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import train_seed
from safetensors.torch import save_file
from torch import nn

from rebasin.models import build_model


def pytest_configure(config: pytest.Config) -> None:
    threads = os.environ.get("REBASIN_TEST_THREADS")  # set by benchmarks/bench_test_stability.py
    if threads:
        torch.set_num_threads(int(threads))


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
        lambda: build_model("vgg", channels=(8, "M", 8), conv_dim=1, image_size=16),
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


@pytest.fixture
def write_st(tmp_path: Path) -> Callable[..., Path]:
    """Write a state dict as .safetensors under tmp_path and return the path."""

    def write(state: dict[str, torch.Tensor], name: str, metadata: dict[str, str] | None = None) -> Path:
        p = tmp_path / name
        save_file({k: v.contiguous() for k, v in state.items()}, str(p), metadata=metadata)
        return p

    return write


@pytest.fixture
def mlp_pair(write_st: Callable[..., Path]) -> tuple[Path, Path]:
    """Two independently initialized MLP checkpoints (net.0 / net.2 / ... naming)."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_model("mlp", in_features=20, hidden=32, depth=3)
        paths.append(write_st(m.state_dict(), f"m{seed}.safetensors"))
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def trained_mlp_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two small MLPs trained on MNIST-1D with seeds 0 and 1 (about a second each), cached."""
    from rebasin.commands.train import train_checkpoint

    d = tmp_path_factory.mktemp("trained_mlp")
    args = {"in_features": 40, "hidden": 128, "depth": 2, "num_classes": 10}
    paths = []
    for seed in (0, 1):
        p = d / f"mlp{seed}.safetensors"
        train_checkpoint("mlp", args, "mnist1d", p, seed=train_seed(seed), epochs=8)
        paths.append(p)
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def trained_bn_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two small BatchNorm MLPs (3 hidden layers) trained on MNIST-1D, cached."""
    from rebasin.commands.train import train_checkpoint

    d = tmp_path_factory.mktemp("trained_bn")
    args = {"in_features": 40, "hidden": 128, "depth": 3, "num_classes": 10, "norm": "bn"}
    paths = []
    for seed in (0, 1):
        p = d / f"bn{seed}.safetensors"
        train_checkpoint("mlp", args, "mnist1d", p, seed=train_seed(seed), epochs=8)
        paths.append(p)
    return paths[0], paths[1]
