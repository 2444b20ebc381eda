"""Shared fixtures: checkpoints written for one test, and small trained pairs (cached per session)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import train_seed
from safetensors.torch import save_file

from rebasin.models import build_model


def pytest_configure(config: pytest.Config) -> None:
    threads = os.environ.get("REBASIN_TEST_THREADS")  # set by benchmarks/bench_test_stability.py
    if threads:
        torch.set_num_threads(int(threads))


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
