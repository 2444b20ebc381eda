"""Input checks shared by every command: two checkpoints that fit each other, finite float weights."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from rebasin.checkpoint import Checkpoint, LazyStateDict, natural_key
from rebasin.checkpoint.state import TensorInfo
from rebasin.core.errors import CheckpointError, ConfigError
from rebasin.matching.costs import param_dot
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


def check_all_finite(cks: Sequence[Checkpoint], dots: Collection[str] = ()) -> dict[str, float]:
    """:func:`check_finite` on every checkpoint, two at a time (the SHA-256 of a file keeps a
    core busy: a pair scans in about half the time, one tensor of each in memory). The error
    raised is the one a scan in order would raise: the first failing checkpoint's; a failure
    stops the scans of the checkpoints after it.

    For a pair, returns ``<A_p, B_p>`` (:func:`param_dot`) of the parameters named in ``dots``
    that the two scans met in the same order (:class:`_Meeting`): weight matching's objective at
    the start, without a pass of its own."""
    stops = [threading.Event() for _ in cks]
    meeting = _Meeting(dots) if len(cks) == 2 and dots else None

    def scan(i: int) -> None:
        try:
            check_finite(cks[i], stops[i], meeting.hook(i) if meeting else None)
        except _Stopped:
            pass
        except BaseException:
            for later in stops[i + 1 :]:
                later.set()
            raise
        finally:
            if meeting:
                meeting.leave(i)

    with ThreadPoolExecutor(2, thread_name_prefix="rebasin-scan") as pool:
        done = [pool.submit(scan, i) for i in range(len(cks))]
        for f in done:
            f.result()
    return meeting.dots if meeting else {}


class _Meeting:
    """Where the scans of A and B meet to take ``<A_p, B_p>`` of the named parameters, holding at
    most one tensor each beyond the one being read. A scan that finds a tensor waiting for it
    takes the product; else it leaves its own and reads on, and waits before leaving a second.
    Checkpoints written by the same code store their tensors in the same order, so neither waits
    long. When both would wait (different orders) or the other scan has ended, they stop
    meeting: what was taken stands, matching reads the rest."""

    def __init__(self, names: Collection[str]):
        self.names = set(names)
        self.dots: dict[str, float] = {}
        self._cond = threading.Condition()
        self._left: list[dict[str, torch.Tensor]] = [{}, {}]
        self._waiting = [False, False]
        self._gone = [False, False]
        self._over = False
        self._scratch: list[dict[torch.dtype, torch.Tensor]] = [{}, {}]

    def hook(self, i: int) -> Callable[[str, torch.Tensor], None]:
        return lambda k, t: self._meet(i, k, t)

    def _meet(self, i: int, k: str, t: torch.Tensor) -> None:
        if k not in self.names:
            return
        other = 1 - i
        with self._cond:
            if self._over:
                return
            mate = self._left[other].pop(k, None)
            if mate is None:
                while self._left[i] and not self._over:
                    if self._waiting[other] or self._gone[other]:
                        self._stop()
                        break
                    self._waiting[i] = True
                    self._cond.wait()
                    self._waiting[i] = False
                if not self._over:
                    self._left[i][k] = t
                return
            self._cond.notify_all()
        a, b = (t, mate) if i == 0 else (mate, t)
        value = param_dot(a, b, self._scratch[i])
        with self._cond:
            self.dots[k] = value

    def leave(self, i: int) -> None:
        with self._cond:
            self._gone[i] = True
            if self._waiting[1 - i]:
                self._stop()

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
