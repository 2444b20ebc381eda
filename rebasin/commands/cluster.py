"""Running on a Ray cluster (``--ray local|auto|ADDRESS``): connecting, and mapping calls over
Ray tasks (the alpha points of a barrier; a plan's items, in ``rebasin.commands.batch``).

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
                cancel_running(self.ray, refs[got:])


def cancel_running(ray: Any, refs: Sequence[Any]) -> None:
    """Cancel the tasks of ``refs`` that have not finished (cancelling a finished task can race
    with its reply inside Ray, so those are left alone)."""
    _, running = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    for ref in running:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
