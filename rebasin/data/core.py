"""The in-memory Dataset and how a data argument (name, file, or hook) becomes one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from rebasin.core.errors import ConfigError
from rebasin.core.registry import Registry
from rebasin.core.usercode import call_user, import_object


@dataclass
class Dataset:
    """Train and test tensors of a classification task."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x_train.shape[1:])

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``train`` or ``test`` tensors."""
        return (self.x_train, self.y_train) if which == "train" else (self.x_test, self.y_test)

    def describe(self) -> dict[str, Any]:
        """Name and sizes, for reports."""
        return {
            "name": self.name,
            "train": len(self.y_train),
            "test": len(self.y_test),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }


DataLoader = Callable[[int], "Dataset"]

DATASETS: Registry[DataLoader] = Registry(
    "data",
    builtins=("rebasin.data.builtin",),
    more="; or a .safetensors/.npz file, or MODULE:FUNCTION",
    known="built-in",
)


def register_data(name: str) -> Callable[[DataLoader], DataLoader]:
    """Decorator registering a built-in data set loader ``fn(seed) -> Dataset``."""
    return DATASETS.register(name)


def list_data() -> list[str]:
    """Names of the built-in data sets."""
    return DATASETS.names()


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches over ``(x, y)``; shuffled reproducibly when asked."""
    n = len(y)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def load_data(spec: str, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Turn a data argument into a Dataset: a built-in name, a ``.safetensors``/``.npz`` file with
    ``x``, ``y`` (and optionally ``x_test``, ``y_test``), or ``MODULE:FUNCTION`` returning a Dataset
    or ``(x_train, y_train, x_test, y_test)``."""
    if spec in DATASETS:
        return validate(DATASETS.get(spec)(seed), spec)
    p = Path(spec)
    if p.suffix in (".npz", ".safetensors"):
        return validate(_from_file(p, seed, test_fraction), spec)
    if ":" in spec:
        return validate(_from_hook(spec, seed), spec)
    raise DATASETS.unknown(spec)


def _from_file(p: Path, seed: int, test_fraction: float) -> Dataset:
    name = str(p)
    if not p.exists():
        raise ConfigError("no such file", source=name)
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: torch.from_numpy(np.asarray(z[k])) for k in z.files}
        else:
            arrays = load_file(str(p))
    except Exception as e:
        raise ConfigError(f"cannot read data ({str(e).splitlines()[0]})", source=name) from None
    if "input_ids" in arrays and "x" not in arrays and "x_train" not in arrays:
        return _tokens(name, arrays, seed, test_fraction)
    for k in ("x", "y"):
        if k not in arrays and f"{k}_train" not in arrays:
            raise ConfigError(
                f"data file has no '{k}' array (found: {', '.join(arrays) or 'none'})", source=name
            )
    xk = "x_train" if "x_train" in arrays else "x"
    yk = "y_train" if "y_train" in arrays else "y"
    x, y = arrays[xk], arrays[yk]
    pairs = [(xk, yk)] + ([("x_test", "y_test")] if "x_test" in arrays and "y_test" in arrays else [])
    for a, b in pairs:
        if arrays[a].dim() == 0 or arrays[b].dim() == 0 or len(arrays[a]) != len(arrays[b]):
            ra = len(arrays[a]) if arrays[a].dim() else 0
            rb = len(arrays[b]) if arrays[b].dim() else 0
            raise ConfigError(f"'{a}' has {ra} rows but '{b}' has {rb}; they must match", source=name)
    for k, t in arrays.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConfigError(f"array '{k}' holds NaN or Inf values", source=name)
    if "x_test" in arrays and "y_test" in arrays:
        xt, yt = arrays["x_test"], arrays["y_test"]
    else:
        n = len(y)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_test = max(1, round(n * test_fraction)) if n > 1 else 0
        test, train = order[:n_test], order[n_test:]
        x, y, xt, yt = x[train], y[train], x[test], y[test]
    return _make(name, x, y, xt, yt)


def _tokens(name: str, arrays: dict[str, torch.Tensor], seed: int, test_fraction: float) -> Dataset:
    """Language-model data: ``input_ids`` (sequences, tokens), optionally ``input_ids_test``.
    Inputs and labels are the same ids; a model predicts each next token."""
    ids = arrays["input_ids"]
    if ids.dim() != 2 or ids.is_floating_point():
        raise ConfigError(
            f"'input_ids' must be integer token ids of shape (sequences, tokens), got {tuple(ids.shape)} "
            f"{str(ids.dtype).removeprefix('torch.')}",
            source=name,
        )
    ids = ids.long()
    if "input_ids_test" in arrays:
        test = arrays["input_ids_test"].long()
    else:
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, round(len(ids) * test_fraction)) if len(ids) > 1 else 0
        ids, test = ids[order[n_test:]], ids[order[:n_test]]
    vocab = int(max(int(ids.max()), int(test.max()) if len(test) else 0)) + 1
    return Dataset(name, ids, ids, test, test, vocab)


def _from_hook(spec: str, seed: int) -> Dataset:
    fn = import_object(spec, "function")
    out = call_user(spec, "the data hook", fn)
    if isinstance(out, Dataset):
        return out
    if isinstance(out, tuple | list) and len(out) == 4:
        return _make(spec, *(torch.as_tensor(np.asarray(t)) for t in out))
    raise ConfigError(
        "the data hook must return a Dataset or (x_train, y_train, x_test, y_test)", source=spec
    )


def _make(name: str, x: Any, y: Any, xt: Any, yt: Any) -> Dataset:
    x, xt = torch.as_tensor(x), torch.as_tensor(xt)
    y, yt = torch.as_tensor(y), torch.as_tensor(yt)
    if x.is_floating_point():
        x, xt = x.float(), xt.float()
    if y.is_floating_point() and bool((y == y.round()).all()):
        y, yt = y.long(), yt.long()
    k = int(max(int(y.max()) if len(y) else 0, int(yt.max()) if len(yt) else 0)) + 1
    return Dataset(name, x, y.long() if not y.is_floating_point() else y, xt, yt.long(), k)


def validate(d: Dataset, source: str) -> Dataset:
    """Non-empty, matching lengths, integer labels in [0, num_classes)."""
    if len(d.y_train) == 0 or len(d.x_train) == 0:
        raise ConfigError("data is empty (no training examples)", source=source)
    if len(d.y_test) == 0:
        raise ConfigError("data has no test examples", source=source)
    for split, x, y in (("train", d.x_train, d.y_train), ("test", d.x_test, d.y_test)):
        if len(x) != len(y):
            raise ConfigError(f"{split} split has {len(x)} inputs but {len(y)} labels", source=source)
        if y.is_floating_point():
            raise ConfigError(f"{split} labels must be integers, got {y.dtype}", source=source)
        if bool((y < 0).any()) or bool((y >= d.num_classes).any()):
            bad = int(y[(y < 0) | (y >= d.num_classes)][0])
            raise ConfigError(f"{split} label {bad} is out of range [0, {d.num_classes})", source=source)
        tokens = x.shape == y.shape and x.dim() == 2  # language-model ids: inputs are the labels
        if not x.is_floating_point() and not tokens:
            raise ConfigError(f"{split} inputs must be floating point, got {x.dtype}", source=source)
    if d.x_train.shape[1:] != d.x_test.shape[1:]:
        raise ConfigError(
            f"train inputs have shape {tuple(d.x_train.shape[1:])}, test inputs {tuple(d.x_test.shape[1:])}",
            source=source,
        )
    return d
