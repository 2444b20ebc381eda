"""Verification wiring: build the model (when one can be built) and check every permutation a
command writes or measures: pi(B) must compute what B computes."""

from __future__ import annotations

import multiprocessing
import os
import queue
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from types import TracebackType
from typing import Any

import torch

from rebasin.checkpoint import Checkpoint
from rebasin.errors import CheckpointError, ConfigError
from rebasin.matching.result import Permutation
from rebasin.options import Options
from rebasin.spec.core import PermutationSpec
from rebasin.verify import Verifier

NOT_VERIFIED = {"ok": None}


def verifier_for(opts: Options, ck: Checkpoint) -> tuple[Verifier | None, str]:
    """A verifier for ``ck``'s model, or None and why not. A model given with ``--model`` must
    build; a recorded architecture or ``config.json`` is used when it is trusted."""
    from rebasin.models.resolve import recorded_arch, recorded_data, resolve_model
    from rebasin.spec.trace import TraceError, example_input

    if opts.output.no_verify:
        return None, "not verified: --no-verify"
    model = opts.model.model
    if model is None:
        try:
            known = ck.config is not None or recorded_arch(ck.metadata, ck.name) is not None
        except ConfigError:
            return None, "not verified: the checkpoint's architecture record is refused"
        if not known:
            return None, "not verified: no model (pass --model to verify)"
    ref = resolve_model(model, opts.model.model_args, ck.metadata, ck.name, ck.config)
    scope, scope_note = None, ""
    size = 4 * ck.num_parameters()
    if ref.config is not None and size > VERIFY_BYTES:  # too large to build whole: its first layer
        key = next((k for k in LAYER_KEYS if isinstance(ref.config.get(k), int)), None)
        if key is None:
            return None, f"not verified: the model is too large to build for a check ({size / 2**30:.1f} GB)"
        ref = replace(ref, config={**ref.config, key: 1})
        scope = first_layer
        scope_note = f", on the model cut to its first of {ck.config[key]} layers"  # type: ignore[index]
    built = ref.factory()()  # one model serves the probe and every check

    def factory() -> Any:
        return built

    data = opts.evaluate.data if opts.evaluate else None
    try:
        data = data or recorded_data(ck.metadata, ck.name)
    except ConfigError:
        data = None
    if data:
        from rebasin.data import load_data

        x = load_data(data, opts.run.seed).x_train[:8]
        verifier = Verifier(factory, (x,), f"{len(x)} examples of {data}{scope_note}", ref.name)
    else:
        try:
            inputs = example_input(built)
        except TraceError:
            return None, "not verified: no probe input (pass --data)"
        verifier = Verifier(factory, inputs, f"the model's example input{scope_note}", ref.name)
    verifier.strict = model is not None  # a model built from a record must fit, else no verdict
    verifier.scope = scope
    return verifier, ""


VERIFY_BYTES = 2 << 30
"""Largest float32 model built whole for a check; larger Hugging Face models are checked on a
copy cut to their first layer (embeddings, one block, final norm and head), which runs every
rule of the spec's layer pattern at bounded memory."""

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def first_layer(name: str) -> bool:
    """Whether a tensor belongs to a model cut to its first layer."""
    m = _LAYER.search(name)
    return m is None or int(m.group(1)) == 0


def verify(
    verifier: Verifier | None,
    why_not: str,
    ck: Checkpoint,
    spec: PermutationSpec,
    perm: Permutation,
    what: str = "pi(B)",
    of: str = "B",
) -> dict[str, Any]:
    """Check that ``perm`` preserves ``ck``'s function; the report's ``equivalence`` section.
    Raises CheckpointError naming the first group that breaks it."""
    if verifier is None:
        return {**NOT_VERIFIED, "reason": why_not}
    try:
        eq = verifier.check(ck.state, spec, perm)
    except ConfigError as e:
        if verifier.strict:
            raise
        return {
            **NOT_VERIFIED,
            "reason": f"not verified: the model built from the checkpoint does not fit it ({e.message})",
        }
    if not eq.ok:
        group = verifier.first_breaking_group(ck.state, spec, perm)
        where = f"; the first group that breaks it: '{group}'" if group else ""
        raise CheckpointError(
            f"{what} does not compute what {of} computes (max abs diff {eq.max_abs_diff:.3g}, "
            f"relative {eq.relative:.2g} on {eq.probe}){where}",
            f"check the spec (rebasin spec), freeze the group (--freeze {group or 'GROUP'}), "
            "or pass --no-verify to write it anyway",
            source=ck.name,
        )
    return eq.to_dict()


class Check:
    """The verification of ``ck``'s permutations, prepared while other work runs.

    Building the model (importing its library: seconds of single-threaded Python) and running
    ``ck`` itself need no permutation, so they start at once: in a forked worker process where
    the system forks safely (Linux), which leaves the interpreter lock to the matching, else in a
    thread. ``submit(perm)`` hands a permutation over and ``result()`` waits for its verdict: the
    report's ``equivalence``, or the CheckpointError naming the group that breaks it. Should the
    worker stop or fail unexpectedly, the check runs again in this process."""

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
            self._start(forking() and opts.run.ray is None)

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
    """Whether a verification worker may be a forked process: on Linux, where fork is safe for
    a worker that runs one thread, and not beside a gRPC client (Ray), which forks badly."""
    return sys.platform == "linux" and "grpc" not in sys.modules


def _serve(recv: Callable[[], Any], send: Callable[[tuple[str, Any]], None], args: tuple[Any, ...]) -> None:
    """Build the verifier and run the unpermuted checkpoint, then answer each permutation received
    (None ends): ("ok", equivalence), ("error", a RebasinError), or ("crash", why)."""
    from rebasin.errors import RebasinError, error_line

    opts, model_ck, ck, spec, what, of = args
    try:
        verifier, why = verifier_for(opts, model_ck)
        failure: BaseException | None = None
    except Exception as e:
        verifier, why, failure = None, "", e
    with suppress(Exception):  # a failure here comes again in verify(), reported there
        if verifier is not None and verifier.model_bytes() <= AHEAD_BYTES:
            verifier.prepare(ck.state, spec)
    while (perm := recv()) is not None:
        try:
            if failure is not None:
                raise failure
            send(("ok", verify(verifier, why, ck, spec, perm, what, of)))
        except RebasinError as e:
            send(("error", e))
        except Exception as e:
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
