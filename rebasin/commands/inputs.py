"""Input checks shared by every command: two checkpoints that fit each other, finite float weights."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from rebasin._memory import reusing_freed_memory
from rebasin.checkpoint import Checkpoint, LazyStateDict, natural_key
from rebasin.checkpoint.state import TensorInfo
from rebasin.core.errors import CheckpointError, ConfigError
from rebasin.matching.costs import GroupProducts, param_dot
from rebasin.models.fit import tolerated
from rebasin.spec.core import PermutationSpec


def _fmt_shape(s: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def _names(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _buffer(ck: Checkpoint, name: str) -> bool:
    """A tensor that is no parameter: integer, or a buffer library versions add or drop."""
    return not ck.dtypes[name].is_floating_point or tolerated(None, name, "unexpected")


def check_pair(a: Checkpoint, b: Checkpoint) -> tuple[Checkpoint, list[str]]:
    """Both checkpoints must hold the same float parameters with the same shapes. Tensors on one
    side only that are buffers (integer tensors, ``position_ids`` and the like) are taken from A,
    or dropped when A lacks them: returns B with exactly A's tensors, and a note saying so."""
    only_a = sorted(set(a.shapes) - set(b.shapes), key=natural_key)
    only_b = sorted(set(b.shapes) - set(a.shapes), key=natural_key)
    missing = [k for k in only_a if not _buffer(a, k)]
    if missing:
        raise CheckpointError(f"tensors missing that A has: {_names(missing)}", source=b.name)
    extra = [k for k in only_b if not _buffer(b, k)]
    if extra:
        raise CheckpointError(f"tensors missing that B has: {_names(extra)}", source=a.name)
    for k in sorted(set(a.shapes) & set(b.shapes), key=natural_key):
        if a.shapes[k] != b.shapes[k]:
            raise CheckpointError(
                f"tensor '{k}' has shape {_fmt_shape(b.shapes[k])}, A has {_fmt_shape(a.shapes[k])}",
                source=b.name,
            )
    if not (only_a or only_b):
        return b, []
    notes = []
    if only_a:
        notes.append(f"{b.name} lacks buffers A has, taken from A: {_names(only_a)}")
    if only_b:
        notes.append(f"{b.name} has buffers A lacks, dropped: {_names(only_b)}")
    return _with_names_of(a, b), notes


def _with_names_of(a: Checkpoint, b: Checkpoint) -> Checkpoint:
    """B with exactly A's tensor names: B's own where it has them, A's buffers elsewhere."""
    names = list(a.state)

    def get(k: str) -> torch.Tensor:
        return b.state[k] if k in b.shapes else a.state[k]

    info = {
        k: TensorInfo(
            b.dtypes[k] if k in b.shapes else a.dtypes[k], (b.shapes if k in b.shapes else a.shapes)[k]
        )
        for k in names
    }
    return dataclasses.replace(
        b,
        state=LazyStateDict(names, get, info),
        shapes={k: info[k].shape for k in names},
        dtypes={k: info[k].dtype for k in names},
        order=None,
    )


def check_dtypes(ck: Checkpoint, spec: PermutationSpec | None = None) -> None:
    """Weights (the spec's tensors, and every ``weight`` and ``bias``) must be floating point
    (from the headers alone)."""
    touched = set(spec.params) if spec else set()
    for k in ck.state:
        dt = ck.dtypes[k]
        if not dt.is_floating_point and (
            k in touched or k.endswith((".weight", ".bias")) or k in ("weight", "bias")
        ):
            raise CheckpointError(
                f"tensor '{k}' has integer dtype {str(dt).removeprefix('torch.')}; "
                "weights must be floating point",
                source=ck.name,
            )


def check_finite(
    ck: Checkpoint,
    stop: threading.Event | None = None,
    also: Callable[[str, torch.Tensor], None] | None = None,
) -> None:
    """Float tensors must be finite (one read of the files, which also gives their SHA-256).
    A set ``stop`` ends the scan early (:class:`_Stopped`); ``also(name, tensor)`` sees every
    tensor after its check."""

    def finite(k: str, t: torch.Tensor) -> None:
        if stop is not None and stop.is_set():
            raise _Stopped
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise CheckpointError(f"tensor '{k}' contains {what} values", source=ck.name)
        if also is not None:
            also(k, t)

    ck.scan(finite)


class _Stopped(Exception):
    """A scan ended because an earlier checkpoint's failed."""


def check_all_finite(
    cks: Sequence[Checkpoint], dots: Collection[str] = (), products: GroupProducts | None = None
) -> dict[str, float]:
    """:func:`check_finite` on every checkpoint, two at a time (the SHA-256 of a file keeps a
    core busy: a pair scans in about half the time, one tensor of each in memory). The error
    raised is the one a scan in order would raise: the first failing checkpoint's; a failure
    stops the scans of the checkpoints after it.

    For a pair, returns ``<A_p, B_p>`` (:func:`param_dot`) of the parameters named in ``dots``
    that the two scans met in the same order (:class:`_Meeting`): weight matching's objective at
    the start, without a pass of its own. ``products`` (weight matching's first unit,
    :class:`GroupProducts`) takes its products of the pairs met, in a thread of its own, in
    A's order; only where both files store its tensors in the same order (then the sum is the
    same every time), else it is left empty."""
    if products is not None and (len(cks) != 2 or not _same_order(cks[0], cks[1], products.params)):
        products = None
    stops = [threading.Event() for _ in cks]
    meeting = _Meeting(dots, products) if len(cks) == 2 and (dots or products) else None

    def scan(i: int) -> None:
        ok = False
        try:
            check_finite(cks[i], stops[i], meeting.hook(i) if meeting else None)
            ok = True
        except _Stopped:
            pass
        except BaseException:
            for later in stops[i + 1 :]:
                later.set()
            raise
        finally:
            if meeting:
                meeting.leave(i, ok)

    with (
        reusing_freed_memory(),  # tensor after tensor: the same pages, not fresh ones (1.3x faster)
        ThreadPoolExecutor(3, thread_name_prefix="rebasin-scan") as pool,
    ):
        done = [pool.submit(scan, i) for i in range(len(cks))]
        if meeting is not None and products is not None:
            done.append(pool.submit(meeting.multiply))
        for f in done:
            f.result()
    return {k: v for k, v in meeting.dots.items() if k in dots} if meeting else {}


def _same_order(a: Checkpoint, b: Checkpoint, names: Collection[str]) -> bool:
    """Whether both scans meet ``names`` in the same order (safetensors files, from headers)."""

    def order(ck: Checkpoint) -> list[str] | None:
        locs = ck.locations
        if locs is None:
            return None
        at = {f: i for i, f in enumerate(ck.files)}
        return sorted(
            (k for k in locs if k in names), key=lambda k: (at.get(locs[k].path, -1), locs[k].begin)
        )

    first = order(a)
    return first is not None and first == order(b) and set(first) == set(names)


SCAN_PRODUCTS_THREADS = 2
"""Threads torch may use from which the scan takes weight matching's first products
(:func:`scan_multiplies`): from two, the hashing overlaps them. On 2 cores, planted
TinyLlama-shape pair, three runs each way: the scan 4.2-4.5 -> 13.1-13.8 s, matching
48.4-50.2 -> 38.6-41.0 s, the merge the same (66.6-70.2 s either way), the pair read 2.89
times instead of 3.89. A run held to one thread keeps its products in matching."""


def scan_multiplies() -> bool:
    """Whether the input scan takes weight matching's first products (:func:`check_all_finite`)."""
    return torch.get_num_threads() >= SCAN_PRODUCTS_THREADS


PARK_BYTES = 256 << 20
"""Bytes of tensors a scan may leave waiting for the other's (at least one tensor)."""

QUEUE_BYTES = 32 << 20
"""Bytes of pairs the scans may queue for the first products (at least one pair). The products
take longer than the hashing, so a longer queue would only hold memory: with 256 MiB, a
streamed merge of a 320 MB pair peaked 70 MB higher."""


class _Meeting:
    """Where the scans of A and B meet to take ``<A_p, B_p>`` of the named parameters. A scan
    that finds the other's tensor waiting for it has a pair: the scan with fewer bytes of
    products so far takes it (now, or at its next tensor), so both scans carry half. Else it
    leaves its own and reads on, and waits before leaving more than :data:`PARK_BYTES` (at
    least one tensor). Checkpoints written by the same code store their tensors in the same
    order, so neither waits long. When both would wait (different orders) or the other scan has
    ended, they stop meeting: what was taken stands, matching reads the rest.

    The pairs ``products`` needs are also queued, in the order they were met, for
    :meth:`multiply` (another thread); a scan waits while more than :data:`QUEUE_BYTES` of them
    are queued."""

    def __init__(self, names: Collection[str], products: GroupProducts | None = None):
        self.names = set(names) | (products.params if products is not None else set())
        self.products = products
        self._queued: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._queued_bytes = 0
        self._multiplying = products is not None
        self.dots: dict[str, float] = {}
        self._cond = threading.Condition()
        self._left: list[dict[str, torch.Tensor]] = [{}, {}]
        self._pairs: list[list[tuple[str, torch.Tensor, torch.Tensor]]] = [[], []]
        self._load = [0, 0]
        self._waiting = [False, False]
        self._gone = [False, False]
        self._over = False
        self._scratch: list[dict[str, torch.Tensor]] = [{}, {}]

    def hook(self, i: int) -> Callable[[str, torch.Tensor], None]:
        return lambda k, t: self._meet(i, k, t)

    def _meet(self, i: int, k: str, t: torch.Tensor) -> None:
        if k in self.names:
            with self._cond:
                self._place(i, k, t)
                while self._multiplying and self._queued_bytes > QUEUE_BYTES:
                    self._cond.wait()
        self._take(i)

    def multiply(self) -> None:
        """Take the queued pairs' products, in the order they were met, until both scans end."""
        assert self.products is not None
        try:
            while True:
                with self._cond:
                    while not self._queued and not all(self._gone):
                        self._cond.wait()
                    if not self._queued:
                        return
                    k, a, b = self._queued.pop(0)
                    self._queued_bytes -= a.nbytes + b.nbytes
                    self._cond.notify_all()
                self.products.add(k, a, b)
                del a, b
        finally:
            with self._cond:
                self._multiplying = False
                self._queued = []
                self._cond.notify_all()

    def _place(self, i: int, k: str, t: torch.Tensor) -> None:
        """Pair ``t`` with the other's tensor ``k``, or leave it for the other (under the lock)."""
        other = 1 - i
        if self._over:
            return
        mate = self._left[other].pop(k, None)
        if mate is not None:
            self._waiting[other] = False  # free to leave its next one, whether awake yet or not
            self._cond.notify_all()
            a, b = (t, mate) if i == 0 else (mate, t)
            if self._multiplying and self.products is not None and k in self.products.params:
                self._queued.append((k, a, b))
                self._queued_bytes += a.nbytes + b.nbytes
                self._cond.notify_all()
            j = i if self._gone[other] or self._load[i] <= self._load[other] else other
            self._load[j] += t.nbytes
            self._pairs[j].append((k, a, b))
            return
        while self._left[i] and not self._over and self._parked(i) + t.nbytes > PARK_BYTES:
            if (self._waiting[other] and self._left[other]) or self._gone[other]:
                self._stop()
                return
            self._waiting[i] = True
            self._cond.wait()
            self._waiting[i] = False
        if not self._over:
            self._left[i][k] = t

    def _take(self, i: int) -> None:
        """The products of the pairs given to scan ``i``."""
        with self._cond:
            pairs, self._pairs[i] = self._pairs[i], []
        for k, a, b in pairs:
            value = param_dot(a, b, self._scratch[i])
            with self._cond:
                self.dots[k] = value

    def _parked(self, i: int) -> int:
        return sum(t.nbytes for t in self._left[i].values())

    def leave(self, i: int, ok: bool) -> None:
        """Scan ``i`` has ended (``ok``: it read everything; then it takes its last pairs)."""
        if ok:
            self._take(i)
        with self._cond:
            self._gone[i] = True
            self._cond.notify_all()
            if self._waiting[1 - i]:
                self._stop()
            left, self._pairs[i] = self._pairs[i], []
            if left and not self._gone[1 - i]:  # given to it while it was leaving
                self._pairs[1 - i].extend(left)
        if ok:
            self._take(i)  # pairs it could not hand on

    def _stop(self) -> None:
        self._over = True
        self._left = [{}, {}]
        self._cond.notify_all()


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite: the minimum and maximum carry any NaN or Inf (one fused
    reduction, about 10x faster than ``isfinite``); dtypes without them are upcast."""
    try:
        lo, hi = torch.aminmax(t)
    except (RuntimeError, NotImplementedError):
        return bool(torch.isfinite(t.float()).all())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_device(name: str) -> None:
    """The device must exist on this machine and in this torch build."""

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device '{name}' is not a device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {name}: no CUDA GPU is available (this torch build or machine has none)",
                "use --device cpu",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here", "use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: rebasin runs on cpu, cuda or mps")
