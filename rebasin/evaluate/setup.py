"""Evaluation wiring: the model and data side of a run (barrier curves, the data matchers use)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from rebasin.checkpoint import Checkpoint
from rebasin.core.errors import ConfigError
from rebasin.matching.registry import Matcher
from rebasin.models.resolve import ARCH_KEY, recorded_data
from rebasin.options import EvalOptions, Options
from rebasin.spec.core import PermutationSpec

NO_DATA = "pass --data (mnist1d, digits, synthetic, a .safetensors/.npz file, or MODULE:FUNCTION)"
TASK_BATCH = 256
"""Mini-batch size of the task loss that data-driven matchers optimize."""


def wants_evaluation(opts: Options, a: Checkpoint) -> EvalOptions | None:
    """The evaluation to run, if any: asked for by data, a BatchNorm fix or a gate; a ``--model``
    alone evaluates only when the data is known (recorded in A)."""
    ev = opts.evaluate
    if ev is None:
        return None
    required = ev.data is not None or ev.bn in ("reset", "repair") or ev.max_barrier is not None
    if not required and recorded_data(a.metadata, a.name) is None:
        return None
    return ev


def check_data_available(matcher: Matcher, opts: Options, a: Checkpoint) -> None:
    """For data-driven matchers: say exactly what is missing (data, or a model definition)."""
    if not matcher.needs_data():
        return
    what = f"method '{matcher.name}'" + (
        f" with cost '{getattr(matcher, 'cost', '')}'" if matcher.name == "sinkhorn" else ""
    )
    data = opts.evaluate.data if opts.evaluate else None
    if not (data or recorded_data(a.metadata, a.name)):
        raise ConfigError(f"{what} needs data to run both models on: {NO_DATA}", source=a.name)
    if not (opts.model.model or ARCH_KEY in a.metadata or a.config is not None):
        raise ConfigError(
            f"{what} runs the models: pass --model NAME or MODULE:FACTORY "
            "(the checkpoint records no architecture)",
            source=a.name,
        )


def make_evaluator(a: Checkpoint, opts: Options) -> Any:
    """A PathEvaluator for A's architecture on the chosen data, checked against A."""
    from rebasin.data import load_data
    from rebasin.evaluate.metrics import check_data_fits
    from rebasin.evaluate.paths import PathEvaluator
    from rebasin.evaluate.repair import has_batchnorm
    from rebasin.models.fit import load_into
    from rebasin.models.resolve import resolve_model

    ev = opts.evaluate or EvalOptions()
    ref = resolve_model(opts.model.model, opts.model.model_args, a.metadata, a.name, a.config)
    data_arg = ev.data or recorded_data(a.metadata, a.name)
    if not data_arg:
        raise ConfigError(f"no data: {NO_DATA}", source=a.name)
    data = load_data(data_arg, opts.run.seed)
    tokens = data.x_train.shape == data.y_train.shape and not data.x_train.is_floating_point()
    if tokens and ref.config is not None and not ref.name.endswith(("ForCausalLM", "LMHeadModel")):
        raise ConfigError(
            f"token data measures next-token loss, which needs a causal language model; "
            f"config.json names {ref.name.removeprefix('hf:')}",
            source=a.name,
        )
    factory = ref.factory()
    probe = factory()
    load_into(probe, a.state, a.name, ref.name)
    check_data_fits(probe, data, ref.name)
    bn = ev.bn
    if bn == "auto":
        bn = "reset" if has_batchnorm(probe) else "none"
    return PathEvaluator(
        factory,
        data,
        bn=bn,
        batch_size=ev.batch_size,
        max_train=ev.max_train,
        device=opts.run.device,
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
        from rebasin.evaluate.metrics import activation_features

        ev = self.ev
        return activation_features(
            ev.make_model, self.spec, self.x, device=ev.device, source=self.a.name, model_name=ev.model_name
        )

    def _task(self) -> tuple[Any, Any]:
        if self._fns is None:
            from rebasin.evaluate.metrics import task_loss_fns

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


def evaluation_report(ev: Any, curves: dict[str, Any]) -> dict[str, Any]:
    """The report's ``evaluation`` section: model, data, BatchNorm mode, curves, endpoints."""
    out: dict[str, Any] = {
        "model": {"name": ev.model_name, "args": ev.model_args},
        "data": ev.data.describe() | ({"max_train": ev.max_train} if ev.max_train else {}),
        "bn": ev.bn,
        "paths": {name: c.to_dict() for name, c in curves.items()},
    }
    first = next(iter(curves.values()))
    out["endpoints"] = {
        "a": {s: {"loss": first.loss[s][0], "acc": first.acc[s][0]} for s in first.loss},
        "b": {s: {"loss": first.loss[s][-1], "acc": first.acc[s][-1]} for s in first.loss},
    }
    if "naive" in out["paths"] and "aligned" in out["paths"]:
        out["aligned_worse_than_naive"] = worse_splits(out["paths"])
    return out


def worse_splits(paths: Mapping[str, Any]) -> list[str]:
    """The splits on which the aligned path's loss barrier (linear definition) is above the
    naive path's: alignment made things worse there."""
    naive, aligned = paths["naive"]["barriers"], paths["aligned"]["barriers"]
    return [s for s in aligned if aligned[s]["loss"]["linear"] > naive[s]["loss"]["linear"]]


def gate_value(report: Mapping[str, Any]) -> float | None:
    """The number ``--max-barrier`` is compared with: the test loss barrier (linear definition)
    of the aligned path (of the naive path when nothing was aligned)."""
    ev = report.get("evaluation")
    if not ev:
        return None
    path = "aligned" if "aligned" in ev["paths"] else "naive"
    return float(ev["paths"][path]["barriers"]["test"]["loss"]["linear"])


def gate(value: float | None, limit: float | None) -> str | None:
    """Why ``value`` fails the ``--max-barrier`` gate ``limit`` (None when it passes or no gate
    is set). A barrier that is not a finite number always fails a gate."""
    if limit is None:
        return None
    if value is None:
        return "no barrier was measured"
    if not math.isfinite(value):
        return f"test loss barrier is {value} (the path's loss is not finite)"
    if value > limit:
        return f"test loss barrier {value:.4f} > --max-barrier {limit}"
    return None
