"""The verification of a command's permutations, prepared while the command works: a worker
builds the model and runs the unpermuted checkpoint before the permutation is known, then checks
each permutation handed to it."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import suppress
from types import TracebackType
from typing import Any

import torch

from rebasin.checkpoint import Checkpoint
from rebasin.matching.result import Permutation
from rebasin.options import Options
from rebasin.pipeline.verification import verifier_for, verify
from rebasin.spec.core import PermutationSpec


class Check:
    """The verification of ``ck``'s permutations, prepared while other work runs.

    Building the model (importing its library: seconds of single-threaded Python) and running
    ``ck`` itself need no permutation, so they start at once: in a forked worker process at the
    lowest priority where the system forks safely (Linux), which takes only what the command
    leaves idle and never its interpreter lock, else in a thread. ``submit(perm)`` hands a
    permutation over and ``result()`` waits for its verdict: the report's ``equivalence``, or the
    CheckpointError naming the group that breaks it. Should the worker stop or fail unexpectedly,
    the check runs again in this process."""

    def __init__(
        self,
        opts: Options,
        model_ck: Checkpoint,
        ck: Checkpoint,
        spec: PermutationSpec,
        what: str = "pi(B)",
        of: str = "B",
    ):
        self._args = (opts, model_ck, ck, spec, what, of)
        self._perm: Permutation | None = None
        self._answer: tuple[str, Any] | None = None
        self._send: Callable[[Any], None] | None = None
        self._recv: Callable[[], tuple[str, Any]] | None = None
        self._stop: Callable[[], None] = lambda: None
        if not opts.output.no_verify:
            self._start(forking())

    def _start(self, fork: bool) -> None:
        if fork:
            ctx = multiprocessing.get_context("fork")
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve_forked, args=(theirs, self._args, os.getpid()), daemon=True)
            with warnings.catch_warnings():  # 3.12+ warns of fork beside threads: the worker
                warnings.simplefilter("ignore", DeprecationWarning)  # runs one thread, no locks
                proc.start()
            theirs.close()

            senders: list[threading.Thread] = []

            def send(perm: Permutation) -> None:  # a large one fills the pipe: not in our way
                payload = {g: p.numpy() for g, p in perm.items()}
                senders.append(threading.Thread(target=_quietly, args=(mine.send, payload), daemon=True))
                senders[-1].start()

            def stop() -> None:  # the worker writes nothing: it need not finish what it does
                proc.kill()  # even before it has set its own signal handlers
                proc.join()
                for t in senders:  # their pipe is closed at the other end now
                    t.join()
                mine.close()

            self._send, self._recv = send, mine.recv
            self._stop = stop
            return
        asks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        answers: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        thread = threading.Thread(
            target=_serve, args=(asks.get, answers.put, self._args), name="rebasin-verify", daemon=True
        )
        thread.start()
        self._send, self._recv = asks.put, answers.get
        self._stop = lambda: asks.put(None)

    def submit(self, perm: Permutation) -> None:
        """Hand ``perm`` to the check (returns at once)."""
        self._perm, self._answer = perm, None
        if self._send is not None:
            self._send(perm)

    def result(self) -> dict[str, Any]:
        """The verdict on the last permutation submitted (waits for it)."""
        assert self._perm is not None, "submit a permutation first"
        if self._answer is None:
            self._answer = self._ask()
        kind, value = self._answer
        if kind == "error":
            raise value
        return dict(value)

    def __call__(self, perm: Permutation) -> dict[str, Any]:
        self.submit(perm)
        return self.result()

    def _ask(self) -> tuple[str, Any]:
        opts, model_ck, ck, spec, what, of = self._args
        assert self._perm is not None
        if opts.output.no_verify:
            return "ok", verify(None, "not verified: --no-verify", ck, spec, self._perm)
        if self._recv is not None:
            try:
                answer = self._recv()
            except (EOFError, OSError):
                answer = ("crash", "the worker stopped")
            if answer[0] != "crash":
                return answer
        self.close()  # whatever went wrong there comes again here, reported as usual
        return "ok", verify(*verifier_for(opts, model_ck), ck, spec, self._perm, what, of)

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        stop, self._stop = self._stop, lambda: None
        self._send = self._recv = None
        stop()

    def __enter__(self) -> Check:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


AHEAD_BYTES = 1 << 30
"""Largest model (float32 parameters) loaded and run on the unpermuted checkpoint before the
permutation is known, beside the matching; a larger one is built ahead (its memory untouched)
but loaded only afterwards, so that it never adds to the matching's own peak."""


def _quietly(send: Callable[[Any], None], payload: Any) -> None:
    with suppress(OSError):  # a worker that is gone: result() finds its pipe closed
        send(payload)


def forking() -> bool:
    """Whether a verification worker may be a forked process: on Linux, where fork is safe for a
    worker that runs one thread, and not inside a Ray process or beside a gRPC client, whose
    runtimes do not survive a fork."""
    if sys.platform != "linux" or "grpc" in sys.modules:
        return False
    ray = sys.modules.get("ray")
    return ray is None or not ray.is_initialized()


def _serve(recv: Callable[[], Any], send: Callable[[tuple[str, Any]], None], args: tuple[Any, ...]) -> None:
    """Build the verifier and run the unpermuted checkpoint, then answer each permutation received
    (None ends): ("ok", equivalence), ("error", a RebasinError), or ("crash", why)."""
    from rebasin.errors import RebasinError, error_line

    opts, model_ck, ck, spec, what, of = args
    try:
        verifier, why = verifier_for(opts, model_ck)
        failure: BaseException | None = None
    except BaseException as e:  # whatever it is, it is answered, never left for a waiter to miss
        verifier, why, failure = None, "", e
    with suppress(BaseException):  # a failure here comes again in verify(), reported there
        if verifier is not None and verifier.model_bytes() <= AHEAD_BYTES:
            verifier.prepare(ck.state, spec)
    while (perm := recv()) is not None:
        try:
            if failure is not None:
                raise failure
            send(("ok", verify(verifier, why, ck, spec, perm, what, of)))
        except RebasinError as e:
            send(("error", e))
        except BaseException as e:  # anything else: the command checks again itself
            send(("crash", error_line(e)))


def _serve_forked(conn: Any, args: tuple[Any, ...], parent: int) -> None:
    """``_serve`` in a forked worker at the lowest priority, on one thread (a forked OpenMP pool
    would hang); Ctrl-C is left to the parent, which stops the worker, SIGTERM ends it at once,
    and so does the parent's end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the command's handler: it has no files
    _die_with_parent(parent)
    with suppress(OSError):
        os.nice(19)  # it takes what the command leaves idle, not a share of its cores
    torch.set_num_threads(1)

    def recv() -> Permutation | None:
        try:
            got = conn.recv()
        except (EOFError, OSError):
            return None
        return None if got is None else {g: torch.from_numpy(p) for g, p in got.items()}

    def send(answer: tuple[str, Any]) -> None:
        try:
            conn.send(answer)
        except Exception as e:  # an answer that does not pickle
            conn.send(("crash", f"{type(e).__name__}: {e}"))

    _serve(recv, send, args)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when its parent ends (prctl PR_SET_PDEATHSIG), so a killed
    command leaves no worker behind; where that is not possible, the closed pipe ends it later."""
    with suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before that took effect
        os._exit(0)
