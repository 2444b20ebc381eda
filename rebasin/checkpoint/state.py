"""The in-memory view of a checkpoint: lazy tensors, metadata, the files behind it."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from rebasin.checkpoint.reader import Location, scan_files

StateDict = Mapping[str, torch.Tensor]


class TensorInfo(NamedTuple):
    """A tensor's dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return math.prod(self.shape) * self.dtype.itemsize


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping whose tensors are produced on access by ``getter(key)``."""

    def __init__(
        self,
        keys: Iterable[str],
        getter: Callable[[str], torch.Tensor],
        info: Mapping[str, TensorInfo] | None = None,
    ):
        self._keys = list(keys)
        self._index = set(self._keys)
        self._getter = getter
        self.info = info
        """Each tensor's dtype and shape where known without producing it (None: not known)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._index:
            raise KeyError(key)
        return self._getter(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index


def info_of(state: Mapping[str, torch.Tensor]) -> Mapping[str, TensorInfo] | None:
    """The dtypes and shapes a lazy state dict knows without producing its tensors."""
    return getattr(state, "info", None)


def tensor_info(state: Mapping[str, torch.Tensor], key: str) -> TensorInfo:
    """A tensor's dtype and shape, without producing it where the mapping knows them."""
    info = info_of(state)
    if info is not None and key in info:
        return info[key]
    t = state[key]
    return TensorInfo(t.dtype, tuple(t.shape))


def shape_of(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape, without reading it where the mapping knows it (lazy checkpoints)."""
    return tensor_info(state, key).shape


@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensors (possibly lazy), string metadata and the files behind it."""

    path: Path
    format: str
    state: StateDict
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    order: list[str] | None = None
    """The tensor order the file was written in, where the format keeps it (.pt files)."""
    config: dict[str, Any] | None = None
    """A Hugging Face ``config.json`` found in the checkpoint's directory (or next to its file)."""
    model_dir: Path | None = None
    """The Hugging Face model directory the checkpoint was read from (config and tokenizer files)."""
    locations: dict[str, Location] | None = None
    """Where each tensor's bytes lie in the files (safetensors), for single-pass scans."""
    digest: str | None = None
    """The SHA-256 of the files, once a scan or :meth:`sha256` has read them."""

    @property
    def name(self) -> str:
        """How error messages name this checkpoint (the path as given)."""
        return str(self.path)

    def sha256(self) -> str:
        """SHA-256 over the bytes of every file of the checkpoint, in order."""
        if self.digest is None:
            h = hashlib.sha256()
            for f in self.files:
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
            self.digest = h.hexdigest()
        return self.digest

    def scan(self, visit: Callable[[str, torch.Tensor], None]) -> None:
        """Hand every tensor to ``visit(name, tensor)``, one at a time. Safetensors files are read
        once, in order, and their SHA-256 comes with the same pass."""
        if self.locations is not None:
            self.digest = scan_files(self.files, self.locations, visit)
            return
        for k in self.state:
            visit(k, self.state[k])

    def num_parameters(self, floating: bool = True) -> int:
        """Number of elements over the floating-point tensors (the parameters and float
        buffers), or with ``floating=False`` over the integer ones (``position_ids``,
        ``num_batches_tracked``), which are not parameters."""
        n = 0
        for name, s in self.shapes.items():
            if self.dtypes[name].is_floating_point != floating:
                continue
            k = 1
            for d in s:
                k *= d
            n += k
        return n

    def dtype_counts(self) -> dict[str, int]:
        """How many tensors of each dtype."""
        out: dict[str, int] = {}
        for dt in self.dtypes.values():
            key = str(dt).removeprefix("torch.")
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key placing 'layer2' before 'layer10' and 'net.2' before 'net.10'."""
    out: list[tuple[int, int | str]] = []
    for tok in re.split(r"(\d+)", name):
        if tok.isdigit():
            out.append((0, int(tok)))
        elif tok:
            out.append((1, tok))
    return out


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _st_dtype(code: str) -> torch.dtype:
    if code in _ST_DTYPES:
        return _ST_DTYPES[code]
    for attr in ("float8_e4m3fn", "float8_e5m2"):
        if code.upper().replace("_", "") in attr.upper().replace("_", "") and hasattr(torch, attr):
            dt: torch.dtype = getattr(torch, attr)
            return dt
    return torch.uint8


_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_CODES[getattr(torch, _name)] = _code
