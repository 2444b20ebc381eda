"""Running on a Ray cluster (``--ray local|auto|ADDRESS``): batch items as Ray tasks, and the
alpha points of a barrier as parallel evaluations.

Ray is an optional extra (``pip install "basinmerge[ray]"``) and is imported only when ``--ray``
is given. Workers write their outputs themselves, to the absolute paths the plan names, through
the same output guard and atomic writes as a serial run: on a cluster those paths must be on a
filesystem every node mounts (the plan's folder, typically). Results (summary rows, curve
points) come back to the driver, which prints them as tasks finish.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rebasin.core.errors import ConfigError

RAY_HINT = 'pip install "basinmerge[ray]"'
T = TypeVar("T")
R = TypeVar("R")


def connect(target: str) -> Any:
    """The ``ray`` module, connected: ``local`` starts a private instance on this machine,
    ``auto`` joins the cluster this machine belongs to (``ray start`` ran here), anything else is
    a cluster address (``HOST:PORT`` or ``ray://HOST:PORT``)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs the Ray package, which is not installed", RAY_HINT) from None
    if ray.is_initialized():
        return ray
    quiet: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if target == "local":
            ray.init(num_cpus=os.cpu_count() or 1, **quiet)
        else:
            ray.init(address=target, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"--ray {target}: cannot connect to a Ray cluster ({first})",
            "start one with 'ray start --head', or use --ray local",
        ) from None
    return ray


def _task_options(item: dict[str, Any]) -> dict[str, Any]:
    """The resources one batch item asks for: one CPU, and a GPU when its device is CUDA."""
    device = str(item.get("device") or "cpu")
    return {"num_cpus": 1, "num_gpus": 1 if device.startswith("cuda") else 0, "max_retries": 0}


def _absolute(item: dict[str, Any]) -> dict[str, Any]:
    """The item with its file paths absolute (a worker's folder is not the driver's)."""
    from rebasin.commands.batch import PATH_KEYS

    out = dict(item)
    for k in (*PATH_KEYS, "data", "spec"):
        v = out.get(k)
        if isinstance(v, str) and (k in PATH_KEYS or Path(v).exists()):
            out[k] = str(Path(v).resolve())
    return out


def _run_item(item: dict[str, Any]) -> dict[str, Any]:
    from rebasin.commands.batch import try_item

    return try_item(item)


def run_items(ray: Any, items: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Run batch items as Ray tasks; yield each summary row as its task finishes. A task that
    raises or whose worker dies becomes that item's error row. Interrupted (Ctrl-C), the
    outstanding tasks are cancelled and their temporary files removed."""
    from rebasin.commands.batch import error_row

    remote = ray.remote(_run_item)
    pending: dict[Any, dict[str, Any]] = {}
    for item in items:
        item = _absolute(item)
        pending[remote.options(**_task_options(item)).remote(item)] = item
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(done[0])
            try:
                yield ray.get(done[0])
            except Exception as e:  # the worker died, or the task could not run
                yield error_row(item, e)
    finally:
        if pending:
            _cancel(ray, pending)


def _cancel(ray: Any, pending: dict[Any, dict[str, Any]]) -> None:
    """Cancel tasks still running and remove the temporary files they leave behind."""
    from rebasin.checkpoint.atomic import clean_stale
    from rebasin.commands.batch import item_outputs

    _cancel_running(ray, list(pending))
    for ref in pending:
        with contextlib.suppress(Exception):
            ray.get(ref, timeout=30)
    for item in pending.values():
        for o in item_outputs(item):
            clean_stale(o.path.parent)


class RayMap:
    """``map(fn, args)`` over Ray tasks, in order (for the alpha points of a curve). Large shared
    arguments go to the object store once (``share``)."""

    def __init__(self, ray: Any):
        self.ray = ray

    def share(self, value: T) -> Any:
        return self.ray.put(value)

    def map(self, fn: Callable[..., R], calls: Sequence[tuple[Any, ...]], gpu: bool = False) -> Iterator[R]:
        remote = self.ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)(fn)
        refs = [remote.remote(*args) for args in calls]
        got = 0
        try:
            for ref in refs:
                value = self.ray.get(ref)
                got += 1
                yield value
        finally:
            if got < len(refs):  # stopped early (an error, Ctrl-C): cancel what still runs
                _cancel_running(self.ray, refs[got:])


def _cancel_running(ray: Any, refs: Sequence[Any]) -> None:
    """Cancel the tasks of ``refs`` that have not finished (cancelling a finished task can race
    with its reply inside Ray, so those are left alone)."""
    _, running = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    for ref in running:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
