"""Atomic writes: every output appears whole or not at all.

Files are written under a temporary name in their own folder (fsync, then rename); folders are
built as a temporary sibling and swapped in whole (an atomic exchange where the system has one).
Temporary names say which process made them (``.rebasin-tmp-<pid>-...``), so a later run into the
same folder can tell a killed run's leftovers from a live run's work and remove them. Written
files follow the umask; copied files keep their mode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import secrets
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

TMP = ".rebasin-tmp-"
OLD = ".rebasin-old-"
_NAME = re.compile(r"^\.rebasin-(tmp|old)-(\d+)-")


def tmp_name(directory: Path, suffix: str = ".tmp") -> Path:
    """A fresh temporary name in ``directory``, marked with this process's id."""
    return directory / f"{TMP}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def umask() -> int:
    """The process umask (read without changing it for longer than a moment)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the umask."""
    return 0o666 & ~umask()


def fsync_dir(directory: Path) -> None:
    """Make a folder's entries (renames) durable, where the system allows."""
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


def write_tmp(directory: Path, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Run ``write(tmp)`` on a fresh temporary path in ``directory``; fsync it and give it the
    umask's mode. The temporary file is removed if anything fails or the run is interrupted."""
    tmp = tmp_name(directory, suffix)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    p = Path(path)
    tmp = write_tmp(p.parent, lambda t: t.write_bytes(data))
    try:
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)
    return p


def write_with(path: str | os.PathLike[str], write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Let ``write(tmp)`` produce the file (a plotting library, say), then move it to ``path``."""
    p = Path(path)
    tmp = write_tmp(p.parent, write, suffix)
    try:
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def _libc_exchange() -> Callable[[Path, Path], bool]:
    """``exchange(a, b)``: swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); returns
    False where the system has no such call."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return lambda a, b: False
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: Path, b: Path) -> bool:
        rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        if rc == 0:
            return True
        err = ctypes.get_errno()
        if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not on this file system
            return False
        raise OSError(err, os.strerror(err), str(b))

    return exchange


_exchange = _libc_exchange()


def swap_in(staged: Path, final: Path) -> None:
    """Put the folder ``staged`` in place of ``final`` whole. With an atomic exchange, readers see
    the old folder or the new one, never neither; without one, the old folder is parked under a
    marked name first, and a later run puts it back if this one dies in between."""
    if not final.exists():
        os.rename(staged, final)
    elif _exchange(staged, final):
        shutil.rmtree(staged, ignore_errors=True)  # now the old folder; what stays, a later run removes
    else:
        parked = final.parent / f"{OLD}{os.getpid()}-{final.name}"
        os.rename(final, parked)
        os.rename(staged, final)
        shutil.rmtree(parked, ignore_errors=True)
    fsync_dir(final.parent)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(directory: Path, keep: set[str] | None = None) -> list[Path]:
    """Remove what killed runs left in ``directory`` (temporary files and folders of processes no
    longer alive), except names in ``keep`` (files an index still names). A folder parked by a
    swap that never finished is put back where it was. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for e in entries:
        m = _NAME.match(e.name)
        if not m or _alive(int(m.group(2))) or e.name in (keep or set()):
            continue
        if m.group(1) == "old":
            original = directory / e.name[m.end() :]
            if not original.exists():
                with suppress(OSError):
                    os.rename(e, original)
                continue
        with suppress(OSError):
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink()
            removed.append(e)
    return removed


def copy_file(src: Path, dst: Path) -> None:
    """Copy a file atomically, keeping its mode."""
    tmp = write_tmp(dst.parent, lambda t: shutil.copyfile(src, t))
    try:
        shutil.copymode(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Replaced:
    """The outputs a command is about to write, kept as they were until it ends: each existing
    target (a file, or a folder's files) gets a hard link under a temporary name beside it (no data
    copied; a plain copy where the file system has no hard links). If a later output fails,
    :meth:`restore` gives every target its old contents back and removes what the command
    created; :meth:`drop` forgets the old versions once every output is in place. A killed
    command leaves the new outputs, and its kept versions are temporary files the next run into
    the folder removes."""

    def __init__(self, targets: list[Path]):
        self.targets = targets
        self.kept: dict[Path, Path] = {}
        for t in targets:
            if os.path.lexists(t):
                keep = tmp_name(t.parent, f"-kept-{t.name}")
                _hard_copy(t, keep)
                self.kept[t] = keep

    def restore(self, now: list[Path]) -> None:
        """Put every kept target back, and remove the targets in ``now`` that the command created."""
        for t in {*now, *self.targets}:
            if t in self.kept or not os.path.lexists(t):
                continue
            _remove(t)
        for t, keep in self.kept.items():
            if os.path.lexists(t):
                _remove(t)
            os.rename(keep, t)
        self.kept.clear()

    def drop(self) -> None:
        for keep in self.kept.values():
            _remove(keep)
        self.kept.clear()


def _hard_copy(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        dst.mkdir()
        shutil.copymode(src, dst)
        for entry in src.iterdir():
            _hard_copy(entry, dst / entry.name)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _remove(p: Path) -> None:
    with suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
