"""Load checkpoints: safetensors (file, sharded index, directory), .pt/.pth/.bin state dicts.

Loading is lazy for safetensors (tensors are read on access). Nothing read from a file runs code:
pickles load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import pickle
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from rebasin.checkpoint.reader import Location, header_locations, read_tensor
from rebasin.checkpoint.state import Checkpoint, LazyStateDict, TensorInfo, _st_dtype, natural_key
from rebasin.core.errors import CheckpointError
from rebasin.core.textfiles import DuplicateKey, strict_json

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint (lazily where the format allows). Raises CheckpointError on bad input.

    A ``config.json`` of a Hugging Face model (a JSON object with ``model_type`` or
    ``architectures``) in the directory, or next to the file, is read into ``Checkpoint.config``."""
    ck = _load(path)
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    config = read_hf_config(folder / "config.json")
    if config is not None:
        ck.config = config
        if p.is_dir():
            ck.model_dir = p
    return ck


MAX_JSON_BYTES = 64 << 20
"""Largest config.json or shard index read (a real one is kilobytes; LLM indexes a few MB)."""


def regular_file(p: Path, label: str) -> None:
    """Refuse anything but a regular file, unread: a FIFO would hang, a device read forever."""
    try:
        mode = p.stat().st_mode
    except OSError as e:
        raise CheckpointError(f"cannot read ({(e.strerror or str(e)).lower()})", source=label) from None
    if not stat.S_ISREG(mode):
        kinds = {
            stat.S_ISFIFO: "a FIFO",
            stat.S_ISCHR: "a device",
            stat.S_ISBLK: "a device",
            stat.S_ISSOCK: "a socket",
        }
        kind = next((k for test, k in kinds.items() if test(mode)), "not a regular file")
        raise CheckpointError(f"is {kind}, not a checkpoint file; refusing to read it", source=label)


def _read_json(p: Path, label: str, what: str) -> Any:
    regular_file(p, label)
    if p.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(
            f"{what} is larger than {MAX_JSON_BYTES >> 20} MB; refusing to read it", source=label
        )
    try:
        return strict_json(p.read_bytes())
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot parse {what} ({first})", source=label) from None


def inside(folder: Path, entry: object, label: str) -> Path:
    """The file an index names, which must stay inside the index's folder: a relative path
    without ``..`` that does not leave the folder through a symbolic link either."""
    if not isinstance(entry, str) or not entry or "\0" in entry:
        raise CheckpointError(f"the index names an invalid shard {entry!r}", source=label)
    rel = Path(entry)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(
            f"shard '{entry}' named by the index lies outside its folder; refusing it", source=label
        )
    target = folder / rel
    try:
        resolved = target.resolve()
    except (OSError, RuntimeError):
        raise CheckpointError(f"shard '{entry}' cannot be resolved", source=label) from None
    if not resolved.is_relative_to(folder.resolve()):
        raise CheckpointError(
            f"shard '{entry}' named by the index leads outside its folder (symbolic link); refusing it",
            source=label,
        )
    return target


def read_hf_config(path: Path) -> dict[str, Any] | None:
    """A Hugging Face config.json as a dict, or None when absent or not a model config."""
    if not path.exists():
        return None
    data = _read_json(path, str(path), "config.json")
    if isinstance(data, dict) and ("model_type" in data or "architectures" in data):
        return data
    return None


def _load(path: str | os.PathLike[str]) -> Checkpoint:
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise CheckpointError("no such file or directory", source=name)
    if p.is_dir():
        return _load_dir(p, name)
    regular_file(p, name)
    if p.name.endswith(".safetensors.index.json"):
        return _load_index(p, name)
    if p.suffix == ".safetensors":
        return _load_safetensors([p], p, name, "safetensors", {})
    if p.suffix in TORCH_SUFFIXES:
        return _load_torch(p, name)
    raise CheckpointError(
        "not a checkpoint (expected .safetensors, *.safetensors.index.json, a directory of "
        "shards, or a .pt/.pth/.bin state dict)",
        source=name,
    )


def _load_dir(p: Path, name: str) -> Checkpoint:
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _load_index(indexes[0], name, root=p)
    if len(indexes) > 1:
        found = ", ".join(i.name for i in indexes)
        raise CheckpointError(f"several shard indexes in one directory ({found})", source=name)
    shards = sorted(f for f in p.glob("*.safetensors") if not f.name.startswith("."))
    for f in shards:
        inside(p, f.name, name)
    if shards:
        return _load_safetensors(shards, p, name, "safetensors-dir", {})
    torch_files = sorted(f for f in p.iterdir() if f.suffix in TORCH_SUFFIXES and not f.name.startswith("."))
    if len(torch_files) == 1:
        ck = _load_torch(torch_files[0], name)
        ck.path = p
        return ck
    raise CheckpointError("directory holds no .safetensors or single .pt/.bin checkpoint", source=name)


def _load_index(p: Path, name: str, root: Path | None = None) -> Checkpoint:
    index = _read_json(p, name, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("not a valid shard index (no 'weight_map' object)", source=name)
    files = sorted({inside(p.parent, f, name) for f in weight_map.values()})
    for f in files:
        if not f.exists():
            raise CheckpointError(f"shard '{f.name}' listed in the index is missing", source=name)
        regular_file(f, f"{name}/{f.name}")
    raw_meta = index.get("metadata") or {}
    meta = {str(k): str(v) for k, v in raw_meta.items()} if isinstance(raw_meta, dict) else {}
    ck = _load_safetensors(files, root or p, name, "safetensors-sharded", meta)
    ck.files = [p, *files]
    return ck


def _load_safetensors(files: list[Path], path: Path, name: str, fmt: str, meta: dict[str, str]) -> Checkpoint:

    owner: dict[str, Location] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    metadata: dict[str, str] = {}
    for f in files:
        label = name if len(files) == 1 and f == path else f"{name}/{f.name}"
        try:
            h = safe_open(_openable(f), framework="pt", device="cpu")
            keys = list(h.keys())
            for k in keys:
                sl = h.get_slice(k)
                shapes[k] = tuple(int(d) for d in sl.get_shape())
                dtypes[k] = _st_dtype(sl.get_dtype())
            file_meta = h.metadata() or {}
        except SafetensorError as e:
            raise CheckpointError(
                f"not a valid safetensors file ({_clean(e)}); it may be truncated or corrupted",
                source=label,
            ) from None
        except OSError as e:
            raise CheckpointError(f"cannot read ({e.strerror or e})", source=label) from None
        del h  # validated; tensors are read with plain reads (bounded memory), not its map
        _check_header(f, label)
        for k, loc in header_locations(f, dtypes, shapes).items():
            if k in owner:
                raise CheckpointError(f"tensor '{k}' appears in more than one shard", source=label)
            owner[k] = loc
        if not metadata:
            metadata = dict(file_meta)
    metadata = {**metadata, **meta}

    def get(key: str) -> torch.Tensor:
        try:
            return read_tensor(owner[key])
        except OSError as e:  # a file truncated or changed since it was opened
            raise CheckpointError(f"cannot read tensor '{key}' ({_clean(e)})", source=name) from None

    info = {k: TensorInfo(dtypes[k], shapes[k]) for k in owner}
    state = LazyStateDict(sorted(owner, key=natural_key), get, info)
    return Checkpoint(path, fmt, state, metadata, list(files), shapes, dtypes, locations=owner)


def _openable(f: Path) -> str:
    """A name the safetensors library can open: the path, or for a file name that is not valid
    UTF-8 (allowed by the file system), the same file through /proc/self/fd."""
    name = str(f)
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        fd = os.open(f, os.O_RDONLY)
        _OPEN_FDS.append(fd)  # kept open for the process: the library reopens the name later
        return f"/proc/self/fd/{fd}"


_OPEN_FDS: list[int] = []


def _check_header(f: Path, label: str) -> None:
    """What the safetensors library lets pass: a header that names a tensor twice (the last
    entry would silently win)."""
    with open(f, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
    try:
        strict_json(raw)
    except DuplicateKey as e:
        raise CheckpointError(f"the safetensors header {e} (a tensor named twice)", source=label) from None
    except ValueError as e:
        raise CheckpointError(f"not a valid safetensors file ({e})", source=label) from None


def _load_torch(p: Path, name: str) -> Checkpoint:
    try:
        with open(p, "rb") as fh:
            magic = fh.read(1)
    except OSError as e:
        raise CheckpointError(f"cannot read ({e.strerror or e})", source=name) from None
    is_zip = zipfile.is_zipfile(p)
    if not is_zip and magic != b"\x80":
        raise CheckpointError(
            "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)", source=name
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported" in str(e):
            raise CheckpointError(
                "refusing to load: the file holds Python objects other than tensors "
                "(loaded with weights_only=True)",
                "convert it to a plain state dict or to .safetensors where it was made",
                source=name,
            ) from None
        raise CheckpointError(f"not a PyTorch checkpoint ({first})", source=name) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"not a readable PyTorch checkpoint ({first}); it may be truncated or corrupted",
            source=name,
        ) from None
    state = _find_state_dict(obj, name)
    for k, v in state.items():
        if v.layout != torch.strided:
            raise CheckpointError(
                f"tensor '{k}' is stored {str(v.layout).removeprefix('torch.')}, not dense; "
                "rebasin reads dense tensors only",
                "convert it with .to_dense() where the checkpoint was made",
                source=name,
            )
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    dtypes = {k: v.dtype for k, v in state.items()}
    ordered = {k: state[k] for k in sorted(state, key=natural_key)}
    return Checkpoint(p, "torch", ordered, {}, [p], shapes, dtypes, order=list(state))


def _is_tensor_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: object, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_tensor_dict(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        raise CheckpointError(
            f"no state dict found (top-level keys: {keys or 'none'})",
            "expected a mapping of tensor names to tensors, or a dict holding one under 'state_dict'",
            source=name,
        )
    raise CheckpointError(
        f"no state dict found (the file holds a {type(obj).__name__}, not a mapping of tensors)",
        source=name,
    )


def _clean(e: BaseException) -> str:
    return str(e).strip().splitlines()[0].removeprefix("Error while deserializing header: ")
