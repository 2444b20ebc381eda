"""Read safetensors tensors with plain file reads (``pread``), not through a memory map.

A memory map keeps every page it has touched resident in the process, so reading a model once
through it leaves the whole file in the process's memory. Reading each tensor's bytes into its
own buffer leaves only the tensors still referenced: memory stays bounded by what the caller
holds, and the operating system's page cache (not the process) keeps recently read files warm.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Location:
    """Where a tensor's bytes lie in a safetensors file."""

    path: Path
    begin: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def header_locations(
    path: Path, dtypes: dict[str, torch.dtype], shapes: dict[str, tuple[int, ...]]
) -> dict[str, Location]:
    """The byte range of every tensor of a safetensors file (already validated by the loader)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    start = 8 + size
    out = {}
    for k, v in header.items():
        if k == "__metadata__" or k not in dtypes:
            continue
        lo, hi = (int(x) for x in v["data_offsets"])
        out[k] = Location(path, start + lo, start + hi, dtypes[k], shapes[k])
    return out


_read_total = [0]
_read_lock = threading.Lock()


def bytes_read() -> int:
    """Bytes of safetensors files this process has read so far (tensors and scans, all threads)."""
    return _read_total[0]


def _count(n: int) -> None:
    with _read_lock:
        _read_total[0] += n


def read_tensor(loc: Location, fd: int | None = None) -> torch.Tensor:
    """The tensor at ``loc``, in a buffer of its own (read through ``fd`` when given, else a
    descriptor of its own). Raises OSError on a short read."""
    n = loc.end - loc.begin
    need = math.prod(loc.shape) * loc.dtype.itemsize
    if n != need:
        raise OSError(f"its data holds {n} bytes, its shape and dtype need {need}")
    if n == 0:
        return torch.empty(loc.shape, dtype=loc.dtype)
    out = torch.empty(n, dtype=torch.uint8)  # not zero-filled, unlike a bytearray
    own = fd is None
    fd = os.open(loc.path, os.O_RDONLY) if fd is None else fd
    try:
        view = memoryview(out.numpy().data).cast("B")
        done = 0
        while done < n:
            got = os.preadv(fd, [view[done:]], loc.begin + done)
            if got <= 0:
                raise OSError("the file ends inside the tensor's data (truncated?)")
            done += got
    finally:
        if own:
            os.close(fd)
    _count(n)
    return out.view(loc.dtype).reshape(loc.shape)


def scan_files(
    files: list[Path], locations: dict[str, Location], visit: Callable[[str, torch.Tensor], None]
) -> str:
    """Read the files once, in order, and return the SHA-256 of all their bytes, handing every
    tensor to ``visit(name, tensor)`` on the way (one tensor held at a time)."""
    h = hashlib.sha256()
    by_file: dict[Path, list[tuple[str, Location]]] = {}
    for k, loc in locations.items():
        by_file.setdefault(loc.path, []).append((k, loc))
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            pos = 0
            for k, loc in sorted(by_file.get(f, []), key=lambda kv: kv[1].begin):
                if loc.begin < pos:  # overlapping ranges: read the tensor on its own
                    visit(k, read_tensor(loc))
                    continue
                _hash_range(fd, pos, loc.begin, h)
                t = read_tensor(loc, fd)
                h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
                visit(k, t)
                del t
                pos = loc.end
            _hash_range(fd, pos, os.fstat(fd).st_size, h)
        finally:
            os.close(fd)
    return h.hexdigest()


def _hash_range(fd: int, lo: int, hi: int, h: Any) -> None:
    while lo < hi:
        chunk = os.pread(fd, min(hi - lo, 1 << 22), lo)
        if not chunk:
            break
        h.update(chunk)
        lo += len(chunk)
        _count(len(chunk))
