"""The verification of a command's permutations, prepared while the command works: a worker
builds the model and runs the unpermuted checkpoint before the permutation is known, then checks
each permutation handed to it."""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from types import TracebackType
from typing import Any

import torch

from rebasin.checkpoint import Checkpoint
from rebasin.core.errors import RebasinError, error_line
from rebasin.core.types import Permutation
from rebasin.spec.core import PermutationSpec
from rebasin.verify.equivalence import Verifier, verify
from rebasin.verify.plan import VerifyPlan, build_verifier

Target = tuple[Checkpoint, str, str]
"""A checkpoint whose permutations are checked, with the words for the error: ``(ck, what, of)``,
as in "pi(B) does not compute what B computes"."""


class Check:
    """The verification of the targets' permutations, prepared while other work runs.

    Building the model (importing its library: seconds of single-threaded Python) and running
    each target itself need no permutation, so they start at once: in a forked worker process at
    the lowest priority where the system forks safely (Linux), which takes only what the command
    leaves idle and never its interpreter lock, else in a thread. ``submit(perm, i)`` hands target
    ``i``'s permutation over and ``result(i)`` waits for its verdict: the report's
    ``equivalence``, or the CheckpointError naming the group that breaks it. Should the worker stop,
    fail or hang before it is ready (:data:`READY`), the check runs again in this process."""

    def __init__(self, plan: VerifyPlan, seed: int, spec: PermutationSpec, targets: list[Target]):
        self._args = (plan, seed, spec, targets)
        self._numbers = itertools.count()
        self._asked: dict[int, tuple[int, Permutation]] = {}  # target: (request number, perm)
        self._answers: dict[int, tuple[str, Any]] = {}  # request number: (kind, value)
        self._send: Callable[[Any], None] | None = None
        self._recv: Callable[[], Answer] | None = None
        self._stop: Callable[[], None] = lambda: None
        self._local: tuple[Verifier | None, str] | None = None
        self._ready: Callable[[], bool] = lambda: True
        self.waited = 0.0
        """Seconds spent waiting for verdicts, beyond the work done beside the command."""
        if plan.model is not None:
            self._start(forking())

    def _start(self, fork: bool) -> None:
        if fork:
            ctx = multiprocessing.get_context("fork")
            mine, theirs = ctx.Pipe()
            settle_threads()
            proc = ctx.Process(target=_serve_forked, args=(theirs, self._args, os.getpid()), daemon=True)
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)  # until the worker has its own
            try:
                with warnings.catch_warnings():  # 3.12+ warns of fork beside threads: the worker
                    warnings.simplefilter("ignore", DeprecationWarning)  # runs one thread, no locks
                    proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            theirs.close()
            senders: list[threading.Thread] = []

            def send(ask: Ask) -> None:  # a large one fills the pipe: sent beside the command
                n, i, perm = ask
                payload = (n, i, {g: p.numpy() for g, p in perm.items()})
                senders.append(threading.Thread(target=_quietly, args=(mine.send, payload), daemon=True))
                senders[-1].start()

            def stop() -> None:  # the worker writes nothing: it need not finish what it does
                proc.kill()  # even before it has set its own signal handlers
                proc.join()
                for t in senders:  # their pipe is closed at the other end now
                    t.join()
                mine.close()

            def ready() -> bool:  # its first message, once (the parent may wait only now)
                try:
                    return bool(mine.poll(READY_S)) and mine.recv() == READY
                except (EOFError, OSError):
                    return False

            self._send, self._recv, self._stop, self._ready = send, mine.recv, stop, ready
            return
        asks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        thread = threading.Thread(
            target=_serve, args=(asks.get, answers.put, self._args), name="rebasin-verify", daemon=True
        )
        thread.start()
        self._send, self._recv = asks.put, answers.get
        self._stop = lambda: asks.put(None)

    def submit(self, perm: Permutation, i: int = 0) -> None:
        """Hand target ``i``'s permutation to the check (returns at once)."""
        n = next(self._numbers)
        self._asked[i] = (n, perm)
        if self._send is not None:
            self._send((n, i, perm))

    def result(self, i: int = 0) -> dict[str, Any]:
        """The verdict on target ``i``'s last permutation submitted (waits for it)."""
        n, perm = self._asked[i]
        t0 = time.perf_counter()
        try:
            return self._verdict(n, i, perm)
        finally:
            self.waited += time.perf_counter() - t0

    def _verdict(self, n: int, i: int, perm: Permutation) -> dict[str, Any]:
        while n not in self._answers:
            got = self._receive()
            if got is None:  # no worker (any more): the check runs here
                self._answers[n] = ("ok", self._here(i, perm))
            else:
                self._answers[got[0]] = got[1:]
        kind, value = self._answers[n]
        if kind == "error":
            raise value
        return dict(value)

    def __call__(self, perm: Permutation, i: int = 0) -> dict[str, Any]:
        self.submit(perm, i)
        return self.result(i)

    def _receive(self) -> Answer | None:
        ready, self._ready = self._ready, lambda: True
        if self._recv is not None and not ready():
            self.close()  # a worker that never came up: killed, the check runs here
        if self._recv is not None:
            try:
                n, kind, value = self._recv()
                if kind != "crash":
                    return n, kind, value
            except (EOFError, OSError):
                pass
            self.close()  # whatever went wrong there comes again here, reported as usual
        return None

    def _here(self, i: int, perm: Permutation) -> dict[str, Any]:
        plan, seed, spec, targets = self._args
        ck, what, of = targets[i]
        if self._local is None:  # (None, the reason) when nothing is verified
            self._local = build_verifier(plan, seed)
        return verify(*self._local, ck, spec, perm, what, of)

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
"""Largest model (float32 parameters) loaded and run on the unpermuted checkpoints before the
permutations are known, beside the matching; a larger one is built ahead (its memory untouched)
but loaded only afterwards, so that it never adds to the matching's own peak."""


READY = "ready"
"""A forked worker's first message: its thread ran a matrix product (:func:`_serve_forked`)."""

READY_S = 10.0
"""Seconds a forked worker has to say it is ready, counted from when the command first waits for
it (the worker runs at the lowest priority, so it may get no core while the command computes)."""

SETTLE_S = 0.5
"""Most seconds :func:`settle_threads` waits before a fork."""


def settle_threads(gap: float = 0.01, most: float = SETTLE_S) -> None:
    """Wait until no thread of this process is starting or ending: its set of threads (Linux's
    ``/proc/self/task``) the same over ``gap`` seconds; at most ``most`` seconds. A thread that
    ends after ``join()`` returns still runs its libraries' exit handlers: MKL's frees its buffers
    under a lock, and a fork in that moment leaves the lock held in the child, whose first matrix
    product then spins forever (measured: 5 to 7 forks in 40 right after a product thread ended,
    none in 100 after this wait)."""
    try:
        before = set(os.listdir("/proc/self/task"))
        end = time.monotonic() + most
        while time.monotonic() < end:
            time.sleep(gap)
            now = set(os.listdir("/proc/self/task"))
            if now == before:
                return
            before = now
    except OSError:  # no /proc: nothing to wait on
        return


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


Ask = tuple[int, int, Permutation]
"""A request to the worker: (request number, target, permutation)."""
Answer = tuple[int, str, Any]
"""The worker's answer to request n: (n, "ok", equivalence), (n, "error", a RebasinError) or
(n, "crash", why)."""


def _serve(recv: Callable[[], Ask | None], send: Callable[[Answer], None], args: tuple[Any, ...]) -> None:
    """Build the verifier and run the unpermuted targets (when the model is small enough), then
    answer each request received, in order, until None."""

    plan, seed, spec, targets = args
    try:
        verifier, why = build_verifier(plan, seed)
        failure: BaseException | None = None
    except BaseException as e:  # whatever it is, it is answered, never left for a waiter to miss
        verifier, why, failure = None, "", e
    with suppress(BaseException):  # a failure here comes again in verify(), reported there
        if verifier is not None and verifier.model_bytes() <= AHEAD_BYTES:
            for ck, _, _ in targets:
                verifier.prepare(ck.state, spec)
    while (ask := recv()) is not None:
        n, i, perm = ask
        ck, what, of = targets[i]
        try:
            if failure is not None:
                raise failure
            send((n, "ok", verify(verifier, why, ck, spec, perm, what, of)))
        except RebasinError as e:
            send((n, "error", e))
        except BaseException as e:  # anything else: the command checks again itself
            send((n, "crash", error_line(e)))


def _serve_forked(conn: Any, args: tuple[Any, ...], parent: int) -> None:
    """``_serve`` in a forked worker at the lowest priority, on one thread (a forked OpenMP pool
    would hang), after a first matrix product and :data:`READY` (a lock inherited held would
    hang its first product: then the parent finds no READY and checks itself); Ctrl-C is left
    to the parent, which stops the worker, SIGTERM ends it at once, and so does the parent's
    end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the command's handler: it has no files
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # blocked by the parent across the fork
    _die_with_parent(parent)
    with suppress(OSError):
        os.nice(19)  # it takes what the command leaves idle, not a share of its cores
    torch.set_num_threads(1)
    canary = torch.ones(256, 256)
    conn.send(READY if bool((canary @ canary)[0, 0] == 256) else "wrong")  # the BLAS works here
    del canary

    def recv() -> Ask | None:
        try:
            got = conn.recv()
        except (EOFError, OSError):
            return None
        if got is None:
            return None
        n, i, perm = got
        return n, i, {g: torch.from_numpy(p) for g, p in perm.items()}

    def send(answer: Answer) -> None:
        try:
            conn.send(answer)
        except Exception as e:  # an answer that does not pickle
            conn.send((answer[0], "crash", f"{type(e).__name__}: {e}"))

    _serve(recv, send, args)


_STOPS = {signal.SIGINT, signal.SIGTERM}
"""Signals the worker must not take with the command's handlers (blocked across the fork)."""


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when its parent ends (prctl PR_SET_PDEATHSIG), so a killed
    command leaves no worker behind; where that is not possible, the closed pipe ends it later."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before that took effect
        os._exit(0)
