"""LAPJV in worker processes, for assignments solved at once.

``lap``'s LAPJV holds the interpreter lock, so threads take turns with it; scipy's solver
releases it but is 1.6x slower per solve on weight-matching costs. Worker processes run LAPJV
side by side. Each is a plain ``python`` started with this process's import path (no main module
re-run, so a script without a ``__main__`` guard is safe); it imports numpy, scipy and ``lap``,
no torch. A solve sends the square float32 cost, and the permutation it is believed near, over the
worker's pipe (raw arrays behind a fixed header: nothing is unpickled) and reads back the
assignment, which is :func:`solve_assignment`'s with ``lap``, computed there.
"""

from __future__ import annotations

import contextlib
import queue
import struct
import subprocess
import sys
import threading
from typing import IO

import numpy as np

from rebasin.core.errors import MatchError
from rebasin.matching.assignment import solve_assignment

_HEAD = struct.Struct("<qq")
"""A request: the cost's side n and whether a near permutation follows (n float32 rows first)."""

_ERROR = struct.Struct("<q")
"""After a status byte 1: the length of the worker's error message (UTF-8) that follows."""


class LapjvWorkers:
    """Up to ``size`` worker processes, started as solves need them and reused; thread-safe:
    each calling thread takes an idle worker for its solve."""

    def __init__(self, size: int):
        self.size = size
        self._idle: queue.SimpleQueue[subprocess.Popen[bytes]] = queue.SimpleQueue()
        self._all: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._closed = False

    def solve(self, cost: np.ndarray, near: np.ndarray | None = None) -> np.ndarray:
        """``p`` (int64) maximizing ``sum_i cost[i, p[i]]``, solved in a worker process."""
        c = np.ascontiguousarray(cost, dtype=np.float32)
        n = len(c)
        if not c.size:
            return np.zeros(n, dtype=np.int64)
        worker = self._take()
        status, message = b"", ""
        try:
            stdin, stdout = _pipes(worker)
            stdin.write(_HEAD.pack(n, near is not None))
            stdin.write(_view(c))
            if near is not None:
                stdin.write(_view(np.ascontiguousarray(near, dtype=np.int64)))
            stdin.flush()
            status = stdout.read(1)
            out = np.empty(n, dtype=np.int64)
            if status == b"\x00":
                _read_into(stdout, _view(out))
            elif status == b"\x01":
                (length,) = _ERROR.unpack(stdout.read(_ERROR.size))
                message = stdout.read(length).decode("utf-8", "replace")
            else:
                raise EOFError
        except (OSError, EOFError, struct.error):
            self._drop(worker)
            raise MatchError(
                f"an assignment worker process ended unexpectedly (exit code {worker.returncode})",
                "run with --assign-workers 1 to solve in this process",
            ) from None
        except BaseException:  # an interrupt mid-solve: the worker's state is unknown
            self._drop(worker)
            raise
        self._idle.put(worker)
        if status == b"\x01":
            raise ValueError(message)  # the solve's own error, as in this process
        return out

    def _take(self) -> subprocess.Popen[bytes]:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._closed:
                raise MatchError("the assignment workers were closed")
            if len(self._all) < self.size:
                worker = _start()
                self._all.append(worker)
                return worker
        return self._idle.get()

    def _drop(self, worker: subprocess.Popen[bytes]) -> None:
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        _stop(worker)

    def close(self) -> None:
        """Stop every worker (a solve in progress in one ends with an error)."""
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for w in workers:
            _stop(w)


def _start() -> subprocess.Popen[bytes]:
    code = f"import sys; sys.path[:] = {sys.path!r}; from {__name__} import main; main()"
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except OSError as e:  # no interpreter to start (an embedded Python), no processes left
        raise MatchError(
            f"cannot start an assignment worker process: {e}",
            "run with --assign-workers 1 to solve in this process",
        ) from None


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.kill()
    worker.wait()
    for pipe in (worker.stdin, worker.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):  # what was left unwritten to a worker now gone
                pipe.close()


def _pipes(worker: subprocess.Popen[bytes]) -> tuple[IO[bytes], IO[bytes]]:
    assert worker.stdin is not None and worker.stdout is not None
    return worker.stdin, worker.stdout


def _view(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array."""
    return a.data.cast("B")


def _read_into(stream: IO[bytes], view: memoryview) -> None:
    """Fill ``view`` from ``stream`` (EOFError if it ends first)."""
    done = 0
    while done < len(view):
        got = stream.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            raise EOFError
        done += got


def main() -> None:
    """A worker: answer requests on stdin until it closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return
        n, has_near = _HEAD.unpack(head)
        cost = np.empty((n, n), dtype=np.float32)
        _read_into(stdin, _view(cost))
        near = None
        if has_near:
            near = np.empty(n, dtype=np.int64)
            _read_into(stdin, _view(near))
        try:
            p = solve_assignment(cost, "lap", near)
        except Exception as e:  # sent back, raised there
            msg = str(e).encode("utf-8")
            stdout.write(b"\x01" + _ERROR.pack(len(msg)) + msg)
        else:
            stdout.write(b"\x00" + np.ascontiguousarray(p, dtype=np.int64).tobytes())
        stdout.flush()
