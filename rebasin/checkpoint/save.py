"""Save checkpoints as safetensors, atomically (temp file in the same folder, fsync, rename),
sharded above a size limit with a standard index file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from rebasin.checkpoint.state import _ST_CODES, StateDict, natural_key
from rebasin.errors import CheckpointError
from rebasin.options import parse_size


def save_checkpoint(
    state: StateDict,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    shard_size: int | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``state`` as safetensors, atomically; returns the files written.

    ``path`` ending in ``.safetensors`` gives one file, or shards ``NAME-00001-of-0000N.safetensors``
    with ``NAME.safetensors.index.json`` when it exceeds ``shard_size``. Any other path is a directory
    holding ``model.safetensors`` (or shards and ``model.safetensors.index.json``).
    """
    out = Path(path)
    limit = parse_size(shard_size)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if out.suffix == ".safetensors":
        directory, stem = out.parent, out.name.removesuffix(".safetensors")
        single = out
    else:
        out.mkdir(parents=False, exist_ok=True)
        directory, stem = out, "model"
        single = out / "model.safetensors"
    keys = sorted(state, key=natural_key)
    tmp_files: list[Path] = []
    shard_keys: list[list[str]] = []
    shard_bytes: list[int] = []
    try:
        current: dict[str, torch.Tensor] = {}
        current_bytes = 0
        for i, k in enumerate(keys):
            t = state[k].detach().to("cpu")
            nbytes = t.numel() * t.element_size()
            if limit is not None and current and current_bytes + nbytes > limit:
                tmp_files.append(_write_tmp(current, directory, meta))
                shard_keys.append(list(current))
                shard_bytes.append(current_bytes)
                current, current_bytes = {}, 0
            current[k] = t
            current_bytes += nbytes
            if progress:
                progress(i + 1, len(keys))
        tmp_files.append(_write_tmp(current, directory, meta))
        shard_keys.append(list(current))
        shard_bytes.append(current_bytes)
        if len(tmp_files) == 1:
            os.replace(tmp_files[0], single)
            tmp_files.clear()
            _fsync_dir(directory)
            return [single]
        n = len(tmp_files)
        finals = [directory / f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        total = sum(shard_bytes)
        index = {
            "metadata": {**meta, "total_size": str(total)},
            "weight_map": {k: finals[i].name for i, names in enumerate(shard_keys) for k in names},
        }
        index_path = directory / f"{stem}.safetensors.index.json"
        tmp_index = _write_text_tmp(json.dumps(index, indent=2, sort_keys=True) + "\n", directory)
        tmp_files.append(tmp_index)
        for tmp, final in zip(tmp_files[:-1], finals, strict=True):
            os.replace(tmp, final)
        os.replace(tmp_index, index_path)
        tmp_files.clear()
        _fsync_dir(directory)
        return [index_path, *finals]
    finally:
        for f in tmp_files:
            f.unlink(missing_ok=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def copy_model_files(src: Path, dst: Path) -> list[Path]:
    """Copy a model directory's non-weight files (config, tokenizer, generation config, ...) from
    ``src`` to ``dst`` atomically; weights and shard indexes are not copied. Returns the copies."""
    out = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".index.json"):
            continue
        tmp = _write_bytes_tmp(f.read_bytes(), dst)
        os.replace(tmp, dst / f.name)
        out.append(dst / f.name)
    if out:
        _fsync_dir(dst)
    return out


def _write_bytes_tmp(data: bytes, directory: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=".rebasin-", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(name)


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, str]) -> None:
    """Write the safetensors format deterministically (sorted header, sorted data, fixed padding),
    so that the same tensors and metadata always give the same bytes."""
    header: dict[str, object] = {}
    if meta:
        header["__metadata__"] = dict(sorted(meta.items()))
    names = sorted(tensors)
    offset = 0
    for k in names:
        t = tensors[k]
        if t.dtype not in _ST_CODES:
            raise CheckpointError(f"tensor '{k}' has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[k] = {
            "dtype": _ST_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for k in names:
            t = tensors[k].detach().to("cpu").contiguous().reshape(-1)
            if t.numel():
                fh.write(t.view(torch.uint8).numpy().tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def _write_tmp(tensors: dict[str, torch.Tensor], directory: Path, meta: dict[str, str]) -> Path:
    fd, name = tempfile.mkstemp(prefix=".rebasin-", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(name)
    try:
        write_safetensors(tensors, tmp, meta)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_text_tmp(text: str, directory: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=".rebasin-", suffix=".tmp", dir=directory)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(name)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
