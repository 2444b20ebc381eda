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

TASKS = ("classes", "next_token", "tokens", "lm")
"""What the labels are: ``classes`` one per example (N,); ``next_token`` the inputs' own ids,
each position predicting the next; ``tokens`` one per position (N, T), -100 ignored; ``lm``
token ids without labels, whose task (next token or masked tokens) the model's head decides."""


@dataclass
class Dataset:
    """Train and test tensors of a task (see :data:`TASKS`). Token inputs with an attention mask
    are packed as (N, T, 2): ids, then mask."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    task: str = "classes"
    inputs: str = "x"
    """What the inputs are: ``x`` (float features), ``input_ids`` or ``pixel_values``."""

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
    if "pixel_values" in arrays:
        return _images(name, arrays, seed, test_fraction)
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


def _split(arrays: dict[str, torch.Tensor], keys: list[str], seed: int, fraction: float) -> tuple[list, list]:
    """Train and test rows of the arrays ``keys``: their ``_test`` arrays when the file has them,
    else a seeded split."""
    if f"{keys[0]}_test" in arrays:
        return [arrays.get(k) for k in keys], [arrays.get(f"{k}_test") for k in keys]
    n = len(arrays[keys[0]])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * fraction)) if n > 1 else 0
    tr, te = order[n_test:], order[:n_test]
    return [arrays[k][tr] if k in arrays else None for k in keys], [
        arrays[k][te] if k in arrays else None for k in keys
    ]


def _integer(name: str, key: str, t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    ok_dtype = not t.is_floating_point() and t.dtype not in (torch.bool, torch.uint64, torch.uint32)
    if not ok_dtype or t.dim() not in dims:
        want = " or ".join({1: "(examples,)", 2: "(sequences, tokens)"}[d] for d in dims)
        what = "labels" if key.startswith("labels") else "token ids"
        raise ConfigError(
            f"'{key}' must be integer {what} of shape {want}, got {tuple(t.shape)} "
            f"{str(t.dtype).removeprefix('torch.')}",
            source=name,
        )
    return t.long()


def _matching(
    name: str, split: str, i: torch.Tensor, m: torch.Tensor | None, lab: torch.Tensor | None
) -> None:
    """An attention mask has the ids' shape; labels are one per sequence or one per token."""
    if m is not None and m.shape != i.shape:
        raise ConfigError(
            f"'attention_mask{split}' {tuple(m.shape)} must have the shape of "
            f"'input_ids{split}' {tuple(i.shape)}",
            source=name,
        )
    if lab is not None and (len(lab) != len(i) or (lab.dim() == 2 and lab.shape != i.shape)):
        raise ConfigError(
            f"'labels{split}' {tuple(lab.shape)} must be ({len(i)},) or {tuple(i.shape)} "
            f"for 'input_ids{split}' {tuple(i.shape)}",
            source=name,
        )


def _tokens(name: str, arrays: dict[str, torch.Tensor], seed: int, test_fraction: float) -> Dataset:
    """Token data: ``input_ids`` (sequences, tokens), optional ``attention_mask`` (same shape)
    and ``labels``: (sequences,) for sequence classification, (sequences, tokens) for token
    classification (-100 ignored), none for language modelling; each with a ``_test`` array."""
    keys = ["input_ids", "attention_mask", "labels"]
    for k in keys:
        for key in (k, f"{k}_test"):
            if key in arrays:
                arrays[key] = _integer(name, key, arrays[key], (1, 2) if k == "labels" else (2,))
    for split in ("", "_test"):
        if f"input_ids{split}" in arrays:
            _matching(
                name,
                split,
                arrays[f"input_ids{split}"],
                arrays.get(f"attention_mask{split}"),
                arrays.get(f"labels{split}"),
            )
    (ids, mask, y), (ids_t, mask_t, y_t) = _split(arrays, keys, seed, test_fraction)
    if ids_t is None:
        raise ConfigError("'input_ids_test' is needed beside the other _test arrays", source=name)
    if mask is not None and mask_t is not None:
        x, xt = torch.stack([ids, mask], -1), torch.stack([ids_t, mask_t], -1)
    else:
        x, xt = ids, ids_t
    if y is None or y_t is None:
        vocab = int(max(int(ids.max()), int(ids_t.max()) if len(ids_t) else 0)) + 1
        return Dataset(name, x, ids, xt, ids_t, vocab, task="lm", inputs="input_ids")
    task = "classes" if y.dim() == 1 else "tokens"
    n_classes = max(int(y.max()), int(y_t.max()) if len(y_t) else 0) + 1
    return Dataset(name, x, y, xt, y_t, max(n_classes, 1), task=task, inputs="input_ids")


def _images(name: str, arrays: dict[str, torch.Tensor], seed: int, test_fraction: float) -> Dataset:
    """Image classification: ``pixel_values`` (N, channels, height, width) and ``labels`` (N,),
    each with a ``_test`` array."""
    if "labels" not in arrays:
        raise ConfigError("'pixel_values' needs 'labels' (one class per image)", source=name)
    for key in ("labels", "labels_test"):
        if key in arrays:
            arrays[key] = _integer(name, key, arrays[key], (1,))
    (x, y), (xt, yt) = _split(arrays, ["pixel_values", "labels"], seed, test_fraction)
    if xt is None or yt is None:
        raise ConfigError("'pixel_values_test' needs 'labels_test' beside it", source=name)
    if x.dim() != 4 or not x.is_floating_point():
        raise ConfigError(
            f"'pixel_values' must be float images (N, channels, height, width), got {tuple(x.shape)}",
            source=name,
        )
    k = int(max(int(y.max()), int(yt.max()) if len(yt) else 0)) + 1
    return Dataset(name, x.float(), y, xt.float(), yt, k, inputs="pixel_values")


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
        bad = (y < 0) | (y >= d.num_classes)
        if d.task == "tokens":
            bad &= y != -100  # ignored positions
        if bool(bad.any()):
            raise ConfigError(
                f"{split} label {int(y[bad][0])} is out of range [0, {d.num_classes})", source=source
            )
        tokens = x.shape == y.shape and x.dim() == 2  # language-model ids: inputs are the labels
        if not x.is_floating_point() and not tokens and d.inputs != "input_ids":
            raise ConfigError(f"{split} inputs must be floating point, got {x.dtype}", source=source)
    if d.x_train.shape[1:] != d.x_test.shape[1:]:
        raise ConfigError(
            f"train inputs have shape {tuple(d.x_train.shape[1:])}, test inputs {tuple(d.x_test.shape[1:])}",
            source=source,
        )
    return d
