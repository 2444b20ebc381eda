"""The output guard: one check for every path any command writes, made before any work starts.

An output is never an input (by resolved path and by inode, shards and files inside an output
folder included), two outputs never share a path, an existing file is replaced only with
``--force``, a file never goes where a folder is (or the reverse), and the folder it goes into
exists and is writable. Every problem is listed in one error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rebasin.checkpoint.save import shard_pattern
from rebasin.core.errors import CheckpointError

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Output:
    """A path a command will write. ``kind``: ``file`` (one file; ``also``: files written beside
    it, such as a plot's SVG), ``checkpoint`` (a ``.safetensors`` file with its possible shards
    and index, or a folder when the name has no ``.safetensors`` suffix) or ``folder``."""

    path: Path
    role: str
    kind: str = "file"
    also: tuple[Path, ...] = field(default=())

    @property
    def is_folder(self) -> bool:
        return self.kind == "folder" or (self.kind == "checkpoint" and self.path.suffix != ".safetensors")

    def targets(self) -> list[Path]:
        """Every path this output may create or replace."""
        if self.is_folder:
            return [self.path]
        if self.kind == "checkpoint":
            stem = self.path.name.removesuffix(".safetensors")
            index = self.path.with_name(f"{stem}.safetensors.index.json")
            shards = []
            if self.path.parent.is_dir():
                pattern = shard_pattern(stem)
                shards = [f for f in self.path.parent.iterdir() if pattern.fullmatch(f.name)]
            return [self.path, index, *sorted(shards)]
        return [self.path, *self.also]


def checkpoint_output(path: PathLike, role: str = "-o") -> Output:
    """A checkpoint output (file, shards and index, or folder)."""
    return Output(Path(path), role, "checkpoint")


def file_output(path: PathLike, role: str) -> Output:
    """A single-file output (report, spec file)."""
    return Output(Path(path), role, "file")


def plot_output(path: PathLike, role: str = "--plot") -> Output:
    """A plot: the PNG and the SVG beside it."""
    p = Path(path)
    return Output(p, role, "file", (p.with_suffix(".svg"),))


def input_files(path: PathLike) -> list[Path]:
    """The files an input checkpoint consists of (the file; an index and the shards it names;
    every file of a folder)."""
    p = Path(path)
    if p.is_dir():
        return [f for f in p.rglob("*") if f.is_file()][:10_000]
    files = [p]
    if p.name.endswith(".index.json") and p.is_file():
        try:
            names = json.loads(p.read_text()).get("weight_map", {}).values()
            files += [p.parent / n for n in {n for n in names if isinstance(n, str) and n}]
        except (OSError, ValueError, AttributeError):
            pass
    out = []
    for f in files:
        try:
            if f.exists():
                out.append(f)
        except (OSError, ValueError):
            pass
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _problems(o: Output, inputs: Sequence[Path], files: Sequence[Path], force: bool) -> list[tuple[str, str]]:
    p, problems = o.path, []
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return [(str(p), "output directory does not exist")]
    if not os.access(parent, os.W_OK | os.X_OK):
        problems.append((str(p), "the folder it goes into is not writable"))
    if o.is_folder and p.exists() and not p.is_dir():
        problems.append((str(p), "exists and is not a folder; a folder output goes there"))
    if not o.is_folder and p.is_dir():
        problems.append((str(p), "is a directory; give a file name"))
    for i in inputs:
        if _same(p, i):
            problems.append((str(p), "output path is an input; refusing to overwrite it"))
            return problems
        if i.is_dir() and p.resolve().is_relative_to(i.resolve()):
            problems.append((str(p), "output path lies inside an input directory; refusing to write there"))
            return problems
    for t in o.targets():
        hit = next((f for f in files if _same(t, f)), None)
        if hit is not None:
            problems.append((str(p), f"writing it would replace input file '{hit}'; refusing"))
            return problems
    if o.is_folder and p.is_dir():
        root = p.resolve()
        hit = next((f for f in files if f.resolve().is_relative_to(root)), None)
        if hit is not None:
            problems.append((str(p), f"the folder holds input file '{hit}'; refusing to replace it"))
            return problems
    if not force:
        existing = [t for t in o.targets() if t.exists() and not (t.is_dir() and not any(t.iterdir()))]
        if existing:
            problems.append((str(p), "already exists"))
        return problems
    for t in o.targets():
        why = _irreplaceable(t)
        if why:
            problems.append((str(p), why))
            break
    return problems


def _irreplaceable(t: Path) -> str | None:
    """Why an existing output cannot be replaced whole (checked before any work, so that a
    failure changes nothing): a mount point, something that is not a regular file or folder, or
    a folder holding entries that cannot be removed."""
    if not os.path.lexists(t):
        return None
    if t.is_symlink():
        return "is a symbolic link; name the real path to replace it"
    if os.path.ismount(t):
        return "is a mount point, which cannot be replaced; write to a new path inside it"
    if not (t.is_file() or t.is_dir()):
        return "is not a regular file or folder (a device, FIFO or socket); refusing to replace it"
    if t.is_dir():
        for d, dirs, _ in os.walk(t):
            if not os.access(d, os.W_OK | os.X_OK):
                return f"'{d}' cannot be changed (permission denied), so the old folder cannot be replaced"
            if len(dirs) > 10_000:
                break
    return None


def guard_outputs(outputs: Iterable[Output | None], inputs: Iterable[PathLike], force: bool) -> None:
    """Check every output against the inputs, each other and the file system; raise one
    CheckpointError listing every problem (``--force`` only lifts "already exists")."""
    outs = [o for o in outputs if o is not None]
    ins = [Path(i) for i in inputs]
    files = [f for i in ins for f in input_files(i)]
    problems: list[tuple[str, str]] = []
    claimed: dict[Path, str] = {}
    for o in outs:
        problems += _problems(o, ins, files, force)
        for t in [o.path, *o.also]:
            key = t.resolve()
            if key in claimed:
                problems.append((str(t), f"{o.role} and {claimed[key]} name the same path"))
            claimed[key] = o.role
    if not problems:
        return
    hint = "pass --force to overwrite" if all(m == "already exists" for _, m in problems) else None
    if len(problems) == 1:
        raise CheckpointError(problems[0][1], hint, source=problems[0][0])
    raise CheckpointError("; ".join(f"{s}: {m}" for s, m in problems), hint)


def check_output_path(out: PathLike, inputs: Iterable[PathLike], force: bool) -> None:
    """Guard one checkpoint output (see :func:`guard_outputs`)."""
    guard_outputs([checkpoint_output(out)], inputs, force)
