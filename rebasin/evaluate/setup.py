"""The evaluation a run makes, as decided once (:class:`DataPlan`, :class:`EvalPlan`), and
building it: the path evaluator for barrier curves and the data side data-driven matchers get."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rebasin.checkpoint import Checkpoint
from rebasin.core.errors import ConfigError
from rebasin.data import load_data
from rebasin.evaluate.metrics import activation_features, check_data_fits, task_loss_fns
from rebasin.evaluate.paths import PathEvaluator
from rebasin.models.fit import check_fits, load_into, renamed
from rebasin.models.resolve import ModelRef
from rebasin.spec.core import PermutationSpec

NO_DATA = "pass --data (mnist1d, digits, synthetic, a .safetensors/.npz file, or MODULE:FUNCTION)"
TASK_BATCH = 256
"""Mini-batch size of the task loss that data-driven matchers optimize."""
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataPlan:
    """The data the models run on (barrier curves, data-driven matchers), and how: the BatchNorm
    mode (``auto`` already resolved: ``reset`` where the checkpoint has BatchNorm statistics),
    the training examples used and the batch size."""

    name: str
    bn: str
    max_train: int | None = None
    batch_size: int = 1000

    def describe(self) -> str:
        cap = f", at most {self.max_train} training examples" if self.max_train else ""
        return f"{self.name} (BatchNorm: {self.bn}{cap})"


@dataclass(frozen=True)
class EvalPlan:
    """The curves a run measures: the alpha grid, the splits and the gate."""

    alphas: int
    max_barrier: float | None = None
    splits: tuple[str, ...] = SPLITS

    def describe(self) -> str:
        gate = f", gate: test loss barrier <= {self.max_barrier}" if self.max_barrier is not None else ""
        return f"naive and aligned paths at {self.alphas} alphas on {' and '.join(self.splits)}{gate}"


def _prepared(a: Checkpoint, ref: ModelRef, plan: DataPlan, seed: int, weights: bool) -> tuple[Any, Any]:
    """The data and the model factory, checked: the data fits the task the model answers, A fits
    the model (with ``weights``, A's tensors are loaded; else only their shapes are compared), and
    the data's inputs fit the model. Returns (factory, data)."""

    data = load_data(plan.name, seed)
    tokens = data.x_train.shape == data.y_train.shape and not data.x_train.is_floating_point()
    if tokens and ref.config is not None and not ref.name.endswith(("ForCausalLM", "LMHeadModel")):
        raise ConfigError(
            f"token data measures next-token loss, which needs a causal language model; "
            f"config.json names {ref.name.removeprefix('hf:')}",
            source=a.name,
        )
    factory = ref.factory()
    probe = factory()
    if weights:
        load_into(probe, a.state, a.name, ref.name)
    else:
        check_fits(probe, renamed(probe, a.shapes), a.name, ref.name)
    check_data_fits(probe, data, ref.name)
    return factory, data


def check_evaluation(a: Checkpoint, ref: ModelRef, plan: DataPlan, seed: int) -> None:
    """Every check :func:`make_evaluator` makes, from A's headers only (a dry run)."""
    _prepared(a, ref, plan, seed, weights=False)


def make_evaluator(a: Checkpoint, ref: ModelRef, plan: DataPlan, seed: int, device: str) -> Any:
    """A PathEvaluator for A's model on the planned data, checked against A."""

    factory, data = _prepared(a, ref, plan, seed, weights=True)
    return PathEvaluator(
        factory,
        data,
        bn=plan.bn,
        batch_size=plan.batch_size,
        max_train=plan.max_train,
        device=device,
        model_name=ref.name,
        model_args=ref.args,
    )


class EvaluatorData:
    """The data side matchers receive (:class:`rebasin.matching.registry.DataSide`), built lazily
    from a PathEvaluator: only what the matcher asks for is computed."""

    def __init__(self, ev: Any, a: Checkpoint, spec: PermutationSpec, seed: int):
        self.ev, self.a, self.spec, self.seed = ev, a, spec, seed
        x, y = ev.data.x_train, ev.data.y_train
        if ev.max_train:
            x, y = x[: ev.max_train], y[: ev.max_train]
        self.x, self.y = x, y
        self._fns: tuple[Any, Any] | None = None

    def features(self) -> Callable[[Mapping[str, torch.Tensor]], Iterator[dict[str, list[torch.Tensor]]]]:

        ev = self.ev
        return activation_features(
            ev.make_model, self.spec, self.x, device=ev.device, source=self.a.name, model_name=ev.model_name
        )

    def _task(self) -> tuple[Any, Any]:
        if self._fns is None:
            self._fns = task_loss_fns(
                self.ev.make_model,
                self.a.state,
                self.x,
                self.y,
                batch_size=TASK_BATCH,
                seed=self.seed,
                device=self.ev.device,
                batch_stats=self.ev.bn != "none",  # judged as the barrier will be
            )
        return self._fns

    def task_loss(self) -> Callable[[dict[str, torch.Tensor], int], torch.Tensor]:
        fn: Callable[[dict[str, torch.Tensor], int], torch.Tensor] = self._task()[0]
        return fn

    def score(self) -> Callable[[dict[str, torch.Tensor]], float]:
        fn: Callable[[dict[str, torch.Tensor]], float] = self._task()[1]
        return fn

    def batches_per_epoch(self) -> int:
        return max(1, -(-len(self.y) // TASK_BATCH))
