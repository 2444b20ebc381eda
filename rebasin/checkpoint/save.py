"""Save checkpoints as safetensors, atomically (temp file in the same folder, fsync, rename),
sharded above a size limit with a standard index file."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch

from rebasin.checkpoint.atomic import (
    clean_stale,
    copy_file,
    file_mode,
    fsync_dir,
    swap_in,
    tmp_name,
    write_bytes,
    write_tmp,
)
from rebasin.checkpoint.state import _ST_CODES, LazyStateDict, StateDict, natural_key, tensor_info
from rebasin.core.errors import CheckpointError
from rebasin.core.sizes import parse_size


def save_checkpoint(
    state: StateDict,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    shard_size: int | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra: Callable[[Path], list[str]] | None = None,
    gate: Callable[[], object] | None = None,
) -> list[Path]:
    """Write ``state`` as safetensors, atomically; returns the files written.

    ``path`` ending in ``.safetensors`` gives one file, or shards ``NAME-00001-of-0000N.safetensors``
    with ``NAME.safetensors.index.json`` when it exceeds ``shard_size`` (the index is the commit
    point: it names a complete set of shards at every moment). Any other path is a folder holding
    ``model.safetensors`` (or shards and ``model.safetensors.index.json``), built beside its place
    and swapped in whole; ``extra(staged_folder)`` may add files to it first (returning their
    names). An interrupted write leaves the old output or the new one, never a mix. ``gate()``
    runs when every tensor is written and before anything is put in place: if it raises, nothing
    is (a check that ran beside the write refused it)."""
    out = Path(path)
    limit = parse_size(shard_size)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if out.suffix == ".safetensors":
        return _save_file_set(state, out, meta, limit, progress, gate)
    return _save_folder(state, out, meta, limit, progress, extra, gate)


Part = tuple[Path, list[str], int]
"""A shard written under a temporary name: (path, tensor names, bytes)."""


def _write_parts(
    state: StateDict,
    directory: Path,
    meta: dict[str, str],
    limit: int | None,
    progress: Callable[[int, int], None] | None,
    gate: Callable[[], object] | None = None,
) -> list[Part]:
    """Write the tensors in shards of at most ``limit`` bytes, each under a temporary name. Shards
    are planned from the tensors' dtypes and shapes, and each tensor is produced, written and
    dropped in turn: a lazy state (a permuted or merged model) is never held whole."""
    keys = sorted(state, key=natural_key)
    plan: list[tuple[list[str], int]] = [([], 0)]
    for k in keys:
        nbytes = tensor_info(state, k).nbytes
        names, size = plan[-1]
        if limit is not None and names and size + nbytes > limit:
            plan.append(([], 0))
        plan[-1][0].append(k)
        plan[-1] = (plan[-1][0], plan[-1][1] + nbytes)
    parts: list[Part] = []
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], len(keys))

    try:
        for names, size in plan:
            shard = LazyStateDict(names, state.__getitem__, {k: tensor_info(state, k) for k in names})
            path = write_tmp(directory, partial(write_safetensors, shard, meta=meta, written=tick))
            parts.append((path, names, size))
        if gate is not None:
            gate()
    except BaseException:
        for f, _, _ in parts:
            f.unlink(missing_ok=True)
        raise
    return parts


def _index_text(meta: dict[str, str], parts: list[Part], names: list[str]) -> str:
    index = {
        "metadata": {**meta, "total_size": str(sum(b for _, _, b in parts))},
        "weight_map": {k: names[i] for i, (_, keys, _) in enumerate(parts) for k in keys},
    }
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def shard_names(stem: str, n: int) -> list[str]:
    """The standard names of ``n`` shards of ``stem``."""
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def shard_pattern(stem: str) -> re.Pattern[str]:
    """Names of shards of ``stem`` with any count."""
    return re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors")


def indexed_names(index_path: Path) -> set[str]:
    """The file names an existing index refers to (empty if it is missing or unreadable)."""
    try:
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        return {v for v in weight_map.values() if isinstance(v, str) and "/" not in v}
    except (OSError, ValueError, AttributeError):
        return set()


def _save_file_set(
    state: StateDict,
    out: Path,
    meta: dict[str, str],
    limit: int | None,
    progress: Callable[[int, int], None] | None,
    gate: Callable[[], object] | None,
) -> list[Path]:
    d, stem = out.parent, out.name.removesuffix(".safetensors")
    index_path = d / f"{stem}.safetensors.index.json"
    old = indexed_names(index_path)
    clean_stale(d, keep=old)
    parts = _write_parts(state, d, meta, limit, progress, gate)
    temps = [p for p, _, _ in parts]
    try:
        if len(parts) == 1:
            os.replace(temps[0], out)
            temps.clear()
            _remove_set(d, stem, old, keep=set(), index_path=index_path)
            fsync_dir(d)
            return [out]
        finals = shard_names(stem, len(parts))
        # 1. commit: the index names the new shards under their temporary names
        write_bytes(index_path, _index_text(meta, parts, [t.name for t in temps]).encode())
        # 2. the old set's files are no longer named by the index: remove them, then give the
        #    new shards their standard names as second links (the index stays valid throughout)
        _remove_set(d, stem, old, keep={t.name for t in temps}, index_path=None)
        out.unlink(missing_ok=True)  # an older single-file output of the same name
        for tmp, name in zip(temps, finals, strict=True):
            (d / name).unlink(missing_ok=True)
            _link(tmp, d / name)
        write_bytes(index_path, _index_text(meta, parts, finals).encode())
        for t in temps:
            t.unlink(missing_ok=True)
        temps.clear()
        fsync_dir(d)
        return [index_path, *(d / n for n in finals)]
    finally:
        if temps and indexed_names(index_path) & {t.name for t in temps}:
            temps.clear()  # committed: the index names them; the next run finishes the naming
        for t in temps:
            t.unlink(missing_ok=True)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this file system: a copy, renamed into place
        tmp = write_tmp(dst.parent, lambda t: shutil.copyfile(src, t))
        os.replace(tmp, dst)


def _remove_set(d: Path, stem: str, names: set[str], keep: set[str], index_path: Path | None) -> None:
    """Remove an older output of ``stem``: the shards its index named, other shards of ``stem``,
    and (``index_path``) the index itself, first, so nothing names a missing shard."""
    if index_path is not None and (names or index_path.exists()):
        index_path.unlink(missing_ok=True)
    pattern = shard_pattern(stem)
    for f in d.iterdir() if d.exists() else []:
        if f.name in keep:
            continue
        if f.name in names or pattern.fullmatch(f.name):
            f.unlink(missing_ok=True)


def _save_folder(
    state: StateDict,
    out: Path,
    meta: dict[str, str],
    limit: int | None,
    progress: Callable[[int, int], None] | None,
    extra: Callable[[Path], list[str]] | None,
    gate: Callable[[], object] | None,
) -> list[Path]:
    clean_stale(out.parent)
    staged = tmp_name(out.parent, "-" + out.name)
    staged.mkdir()
    try:
        parts = _write_parts(state, staged, meta, limit, progress, gate)
        if len(parts) == 1:
            os.replace(parts[0][0], staged / "model.safetensors")
            names = ["model.safetensors"]
        else:
            names = shard_names("model", len(parts))
            for (tmp, _, _), name in zip(parts, names, strict=True):
                os.replace(tmp, staged / name)
            (staged / "model.safetensors.index.json").write_text(_index_text(meta, parts, names))
            os.chmod(staged / "model.safetensors.index.json", file_mode())
            names = ["model.safetensors.index.json", *names]
        copied = extra(staged) if extra is not None else []
        fsync_dir(staged)
        swap_in(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return [out / n for n in [*names, *copied]]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


SKIPPED_DIRS = (".git", ".cache", "__pycache__", ".ipynb_checkpoints", ".huggingface")
"""Folders a model folder's copy never carries: version control and caches."""


def link_target(link: Path, root: Path) -> Path | None:
    """Where a symbolic link in a model folder points, when a copy may follow it: inside the
    folder, or (a folder from a hub cache, ``.../snapshots/REV/``) into that cache's ``blobs/``.
    None for links that lead anywhere else."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    base = root.resolve()
    allowed = [base]
    if base.parent.name == "snapshots":
        allowed.append(base.parent.parent / "blobs")
    return target if any(target.is_relative_to(a) for a in allowed) else None


def copy_model_files(src: Path, dst: Path, root: Path | None = None) -> list[str]:
    """Copy a model folder's non-weight files and subfolders (config, tokenizer, generation
    config, ``1_Pooling/``, ``modules.json``, dotfiles such as ``.gitattributes``, ...) from
    ``src`` into ``dst``, keeping their modes. Weights, shard indexes, temporary files and
    :data:`SKIPPED_DIRS` are not copied; a symbolic link is copied as what it points to when that
    lies inside the folder or in its hub cache (:func:`link_target`), else left out. Returns the
    copied names, relative to ``dst``."""
    root = root or src
    out: list[str] = []
    for f in sorted(src.iterdir()):
        if f.name in SKIPPED_DIRS or f.name.startswith(".rebasin-"):
            continue
        real = link_target(f, root) if f.is_symlink() else f
        if real is None:
            continue
        if real.is_dir():
            if f.is_symlink():  # a linked folder inside the model folder: its files are there too
                continue
            (dst / f.name).mkdir(exist_ok=True)
            shutil.copymode(real, dst / f.name)
            out += [f"{f.name}/{n}" for n in copy_model_files(f, dst / f.name, root)]
            continue
        if not real.is_file() or f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".index.json"):
            continue
        copy_file(real, dst / f.name)
        out.append(f.name)
    return out


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: Path,
    meta: Mapping[str, str],
    written: Callable[[], None] | None = None,
) -> None:
    """Write the safetensors format deterministically (sorted header, sorted data, fixed padding),
    so that the same tensors and metadata always give the same bytes. The header comes from the
    tensors' dtypes and shapes (known without producing them for lazy state dicts); the tensors
    are then produced and written one at a time (``written()`` after each)."""
    header: dict[str, object] = {}
    if meta:
        header["__metadata__"] = dict(sorted(meta.items()))
    names = sorted(tensors)
    infos = {k: tensor_info(tensors, k) for k in names}
    offset = 0
    for k in names:
        dtype, shape = infos[k]
        if dtype not in _ST_CODES:
            raise CheckpointError(f"tensor '{k}' has dtype {dtype}, which safetensors cannot store")
        n = infos[k].nbytes
        header[k] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for k in names:
            t = tensors[k].detach().to("cpu")
            if (t.dtype, tuple(t.shape)) != infos[k]:
                got, want = f"{t.dtype} {tuple(t.shape)}", f"{infos[k].dtype} {infos[k].shape}"
                raise CheckpointError(f"tensor '{k}' came out as {got}, not {want}")
            t = t.contiguous().reshape(-1)
            if t.numel():
                fh.write(t.view(torch.uint8).numpy().data)
            del t
            if written is not None:
                written()
        fh.flush()
