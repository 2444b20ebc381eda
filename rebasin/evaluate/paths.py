"""Loss and accuracy along the linear path between two models, and barrier metrics.

``theta(alpha) = (1 - alpha) theta_A + alpha theta_B`` for alpha on a grid. One routine serves every
curve: the naive path passes B as it is, the aligned path passes pi(B).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rebasin.core.errors import ConfigError
from rebasin.core.types import Progress
from rebasin.data.core import Dataset
from rebasin.evaluate.metrics import evaluation_sums
from rebasin.evaluate.repair import channel_stats, repair, repair_targets, reset_batchnorm
from rebasin.merge import interpolate
from rebasin.models.fit import load_into

BN_MODES = ("none", "reset", "repair")
SPLITS = ("train", "test")


def alpha_grid(n: int) -> list[float]:
    """``n`` evenly spaced points on [0, 1]; odd ``n`` includes 0.5."""
    if n < 2:
        raise ConfigError(f"--alphas must be at least 2, got {n}")
    return [i / (n - 1) for i in range(n)]


def barrier_metrics(alphas: Sequence[float], values: Sequence[float]) -> dict[str, float]:
    """Both barrier definitions of a curve whose ends are ``values[0]`` and ``values[-1]``:
    ``linear`` = max_a [v(a) - ((1 - a) v(0) + a v(1))] (Frankle et al., Entezari et al.);
    ``mean`` = max_a [v(a) - (v(0) + v(1)) / 2] (Git Re-Basin)."""
    if len(alphas) != len(values) or len(values) < 2:
        raise ValueError("need one value per alpha and at least two points")
    v0, v1 = values[0], values[-1]
    linear = max(v - ((1 - a) * v0 + a * v1) for a, v in zip(alphas, values, strict=True))
    mean = max(v - (v0 + v1) / 2 for v in values)
    return {"linear": linear, "mean": mean}


@dataclass(frozen=True)
class BarrierCurve:
    """Loss and accuracy per split along one path."""

    alphas: list[float]
    loss: dict[str, list[float]]
    acc: dict[str, list[float]]
    bn: str = "none"

    def barriers(self) -> dict[str, dict[str, dict[str, float]]]:
        """split -> loss/error -> definition -> barrier."""
        out = {}
        for split in self.loss:
            err = [1 - a for a in self.acc[split]]
            out[split] = {
                "loss": barrier_metrics(self.alphas, self.loss[split]),
                "error": barrier_metrics(self.alphas, err),
            }
        return out

    def at(self, alpha: float, split: str = "test") -> tuple[float, float]:
        """(loss, accuracy) at the grid point nearest ``alpha``."""
        i = min(range(len(self.alphas)), key=lambda j: abs(self.alphas[j] - alpha))
        return self.loss[split][i], self.acc[split][i]

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": self.alphas,
            "bn": self.bn,
            "loss": self.loss,
            "acc": self.acc,
            "barriers": self.barriers(),
        }


@dataclass
class PathEvaluator:
    """Evaluates interpolation paths of a model family on a data set.

    Args:
        make_model: builds a fresh model of the right architecture.
        data: train/test data.
        bn: ``none``, ``reset`` (recompute BatchNorm statistics at each alpha) or ``repair``.
        max_train: use at most this many training examples (for BN reset, REPAIR and the train
            curve); the test split is used whole.
    """

    make_model: Callable[[], nn.Module]
    data: Dataset
    bn: str = "none"
    batch_size: int = 1000
    max_train: int | None = None
    device: str = "cpu"
    model_name: str = "model"
    model_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise ConfigError(f"--bn must be one of {', '.join(BN_MODES)}, got '{self.bn}'")

    def _model(self, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
        m = self.make_model().to(self.device)
        load_into(m, state, source, self.model_name)
        return m.eval()

    def _train_x(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.x_train, self.data.y_train
        if self.max_train is not None and len(y) > self.max_train:
            x, y = x[: self.max_train], y[: self.max_train]
        return x, y

    def fix_statistics(self, model: nn.Module, alpha: float, endpoint_stats: tuple[Any, Any] | None) -> None:
        """Apply the BatchNorm mode to an interpolated model, in place."""
        x, _ = self._train_x()
        if self.bn == "reset":
            reset_batchnorm(model, x)
        elif self.bn == "repair" and endpoint_stats is not None:
            repair(model, endpoint_stats[0], endpoint_stats[1], alpha, x)

    def endpoint_stats(
        self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]
    ) -> tuple[Any, Any] | None:
        """Per-channel statistics of both endpoints (REPAIR only)."""
        if self.bn != "repair":
            return None
        x, _ = self._train_x()
        out = []
        for state, src in ((a, "A"), (b, "B")):
            m = self._model(state, src)
            out.append(channel_stats(m, repair_targets(m), x))
        return out[0], out[1]

    def point(
        self,
        a: Mapping[str, torch.Tensor],
        b: Mapping[str, torch.Tensor],
        alpha: float,
        stats: Any,
        part: tuple[int, int] = (0, 1),
    ) -> dict[str, tuple[float, int, int]]:
        """Summed loss, correct predictions and examples per split of the model at ``alpha``
        (BatchNorm mode applied), on shard ``part = (i, k)`` of each split: whole batches, so
        the shards of a point add up to the whole."""
        m = self._model(interpolate(a, b, alpha), "interpolation")
        self.fix_statistics(m, alpha, stats)
        out = {}
        for split, (x, y) in (("train", self._train_x()), ("test", self.data.split("test"))):
            lo, hi = shard_rows(len(y), self.batch_size, *part)
            out[split] = evaluation_sums(m, x[lo:hi], y[lo:hi], self.batch_size, self.data.task)
        return out

    def curve(
        self,
        a: Mapping[str, torch.Tensor],
        b: Mapping[str, torch.Tensor],
        alphas: Sequence[float],
        progress: Progress | None = None,
        label: str = "path",
        pool: Any = None,
    ) -> BarrierCurve:
        """Loss/accuracy on train and test at each alpha. With ``pool`` (a
        :class:`rebasin.commands.cluster.RayMap`), the alphas are evaluated in parallel tasks; each point
        is computed exactly as here."""
        a = {k: a[k] for k in a}
        b = {k: b[k] for k in b}
        stats = self.endpoint_stats(a, b)
        loss: dict[str, list[float]] = {s: [] for s in SPLITS}
        acc: dict[str, list[float]] = {s: [] for s in SPLITS}
        k = 1
        if pool is None:
            parts: Iterator[dict[str, tuple[float, int, int]]] = (self.point(a, b, x, stats) for x in alphas)
        else:  # large evaluation sets: each alpha point in shards of whole batches
            k = max(1, -(-max(len(self._train_x()[1]), len(self.data.split("test")[1])) // SHARD_EXAMPLES))
            shared = pool.share((self, a, b, stats))
            calls = [(shared, x, (i, k)) for x in alphas for i in range(k)]
            parts = pool.map(_point_task, calls, gpu=self.device.startswith("cuda"))
        for j in range(len(alphas)):
            sums = {s: [0.0, 0, 0] for s in SPLITS}
            for _ in range(k):
                part = next(parts)
                for s in SPLITS:
                    for t in range(3):
                        sums[s][t] += part[s][t]
            for s in SPLITS:
                total, correct, n = sums[s]
                loss[s].append(total / n)
                acc[s].append(correct / n)
            if progress:
                progress(f"evaluating {label} path", j + 1, len(alphas))
        return BarrierCurve(list(alphas), loss, acc, self.bn)

    def merged_state(
        self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        """The interpolated state with the BatchNorm mode applied, in ``a``'s dtypes."""
        a = {k: a[k] for k in a}
        b = {k: b[k] for k in b}
        m = self._model(interpolate(a, b, alpha), "interpolation")
        self.fix_statistics(m, alpha, self.endpoint_stats(a, b))
        return {k: v.detach().cpu().to(a[k].dtype) for k, v in m.state_dict().items()}


SHARD_EXAMPLES = 20000
"""Examples per evaluation shard when alpha points run as parallel tasks."""


def shard_rows(n: int, batch_size: int, i: int, k: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of shard ``i`` of ``k`` over ``n`` examples, cut at batch boundaries."""
    batches = -(-n // batch_size)
    per = -(-batches // k)
    return min(n, i * per * batch_size), min(n, (i + 1) * per * batch_size)


def _point_task(
    shared: tuple[PathEvaluator, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Any],
    alpha: float,
    part: tuple[int, int],
) -> dict[str, tuple[float, int, int]]:
    """One shard of one alpha point in a worker (``shared``: the evaluator, both endpoints,
    REPAIR statistics)."""
    ev, a, b, stats = shared
    return ev.point(a, b, alpha, stats, part)
