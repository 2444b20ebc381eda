"""Load and save checkpoints: safetensors (file, sharded index, directory), .pt/.pth/.bin state dicts.

Loading is lazy for safetensors (tensors are read on access); writing is atomic (temp file in the
same directory, fsync, rename) and shards above a size limit with a standard index file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rebasin.errors import CheckpointError, ConfigError

StateDict = Mapping[str, torch.Tensor]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping whose tensors are produced on access by ``getter(key)``."""

    def __init__(self, keys: Iterable[str], getter: Callable[[str], torch.Tensor]):
        self._keys = list(keys)
        self._index = set(self._keys)
        self._getter = getter

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

    @property
    def name(self) -> str:
        """How error messages name this checkpoint (the path as given)."""
        return str(self.path)

    def sha256(self) -> str:
        """SHA-256 over the bytes of every file of the checkpoint, in order."""
        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()

    def num_parameters(self) -> int:
        """Total number of elements over all tensors."""
        n = 0
        for s in self.shapes.values():
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


# ----------------------------------------------------------------------------------------- loading


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


def read_hf_config(path: Path) -> dict[str, Any] | None:
    """A Hugging Face config.json as a dict, or None when absent or not a model config."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot parse config.json ({e})", source=str(path)) from None
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
    shards = sorted(p.glob("*.safetensors"))
    if shards:
        return _load_safetensors(shards, p, name, "safetensors-dir", {})
    torch_files = sorted(f for f in p.iterdir() if f.suffix in TORCH_SUFFIXES)
    if len(torch_files) == 1:
        ck = _load_torch(torch_files[0], name)
        ck.path = p
        return ck
    raise CheckpointError("directory holds no .safetensors or single .pt/.bin checkpoint", source=name)


def _load_index(p: Path, name: str, root: Path | None = None) -> Checkpoint:
    try:
        index = json.loads(p.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"not a valid shard index ({e})", source=name) from None
    files = sorted({p.parent / f for f in weight_map.values()})
    for f in files:
        if not f.exists():
            raise CheckpointError(f"shard '{f.name}' listed in the index is missing", source=name)
    meta = {k: str(v) for k, v in (index.get("metadata") or {}).items()}
    ck = _load_safetensors(files, root or p, name, "safetensors-sharded", meta)
    ck.files = [p, *files]
    return ck


def _load_safetensors(files: list[Path], path: Path, name: str, fmt: str, meta: dict[str, str]) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    owner: dict[str, object] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    metadata: dict[str, str] = {}
    for f in files:
        label = name if len(files) == 1 and f == path else f"{name}/{f.name}"
        try:
            h = safe_open(str(f), framework="pt", device="cpu")
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
        for k in keys:
            if k in owner:
                raise CheckpointError(f"tensor '{k}' appears in more than one shard", source=label)
            owner[k] = h
        if not metadata:
            metadata = dict(file_meta)
    metadata = {**metadata, **meta}

    def get(key: str) -> torch.Tensor:
        try:
            return owner[key].get_tensor(key)  # type: ignore[attr-defined]
        except Exception as e:  # corrupted data region
            raise CheckpointError(f"cannot read tensor '{key}' ({_clean(e)})", source=name) from None

    state = LazyStateDict(sorted(owner, key=natural_key), get)
    return Checkpoint(path, fmt, state, metadata, list(files), shapes, dtypes)


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


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key placing 'layer2' before 'layer10' and 'net.2' before 'net.10'."""
    out: list[tuple[int, int | str]] = []
    for tok in re.split(r"(\d+)", name):
        if tok.isdigit():
            out.append((0, int(tok)))
        elif tok:
            out.append((1, tok))
    return out


# ------------------------------------------------------------------------------------------ saving


def parse_size(text: str | int | None) -> int | None:
    """Parse '500MB', '2GB', '1GiB' or a byte count; None stays None."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"invalid size '{text}' (use e.g. 500MB, 2GB, 1GiB)")
    value = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("B").rstrip("I")]
    size = int(value * base**power)
    if size <= 0:
        raise ConfigError(f"invalid size '{text}' (must be positive)")
    return size


def check_output_path(
    out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], force: bool
) -> None:
    """Refuse to overwrite an input, or an existing file unless ``force``."""
    o = Path(out)
    for i in inputs:
        ip = Path(i)
        same = o.resolve() == ip.resolve() or (o.exists() and ip.exists() and o.samefile(ip))
        if same:
            raise CheckpointError(
                "output path is an input; refusing to overwrite it",
                "choose another output path",
                source=str(out),
            )
        if ip.is_dir() and o.resolve().is_relative_to(ip.resolve()):
            raise CheckpointError(
                "output path lies inside an input directory; refusing to write there",
                source=str(out),
            )
    if o.exists() and not force and not (o.is_dir() and not any(o.iterdir())):
        raise CheckpointError("already exists", "pass --force to overwrite", source=str(out))
    if not o.parent.exists():
        raise CheckpointError("output directory does not exist", source=str(out))


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


_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_CODES[getattr(torch, _name)] = _code


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
