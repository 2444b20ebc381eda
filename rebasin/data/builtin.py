"""Built-in data sets, generated or shipped locally: nothing is downloaded."""

from __future__ import annotations

import functools

import numpy as np
import torch

from rebasin.core.errors import ConfigError
from rebasin.data.core import Dataset, register_data


def _standardize(x: np.ndarray, xt: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mu, sd = x.mean(), x.std() + 1e-8
    return torch.tensor((x - mu) / sd, dtype=torch.float32), torch.tensor((xt - mu) / sd, dtype=torch.float32)


@register_data("mnist1d")
@functools.cache
def mnist1d(seed: int = 0) -> Dataset:
    """MNIST-1D (Greydanus, 2020) from the ``mnist1d`` package's local generator: 4000 train and
    1000 test sequences of length 40, 10 classes. The data set is fixed (the package's own seed)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ConfigError("data 'mnist1d' needs the mnist1d package", "pip install mnist1d") from None
    d = make_dataset(get_dataset_args())
    x, xt = _standardize(np.asarray(d["x"]), np.asarray(d["x_test"]))
    return Dataset("mnist1d", x, torch.tensor(d["y"]).long(), xt, torch.tensor(d["y_test"]).long(), 10)


@register_data("digits")
@functools.cache
def digits(seed: int = 0) -> Dataset:
    """scikit-learn's handwritten digits (8x8 images, 1797 samples, 10 classes), split 80/20
    with a fixed order; inputs shaped (1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("data 'digits' needs scikit-learn", "pip install scikit-learn") from None
    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32)[:, None]
    y = np.asarray(bunch.target)
    order = np.random.default_rng(0).permutation(len(y))
    n_test = len(y) // 5
    te, tr = order[:n_test], order[n_test:]
    xtr, xte = _standardize(x[tr], x[te])
    return Dataset("digits", xtr, torch.tensor(y[tr]).long(), xte, torch.tensor(y[te]).long(), 10)


@register_data("synthetic")
def synthetic(seed: int = 0) -> Dataset:
    """A Gaussian-mixture classification task: 32 features, 4 classes, 2000 train / 500 test,
    non-linearly separable (two clusters per class)."""
    rng = np.random.default_rng(1234)
    centers = rng.standard_normal((8, 32)) * 2.0
    labels_of_center = np.arange(8) % 4

    def sample(n: int, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        c = r.integers(0, 8, n)
        return centers[c] + r.standard_normal((n, 32)), labels_of_center[c]

    x, y = sample(2000, np.random.default_rng(1))
    xt, yt = sample(500, np.random.default_rng(2))
    xtr, xte = _standardize(x, xt)
    return Dataset("synthetic", xtr, torch.tensor(y).long(), xte, torch.tensor(yt).long(), 4)
