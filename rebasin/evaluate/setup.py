"""The evaluation a run makes, as decided once (:class:`DataPlan`, :class:`EvalPlan`), and
building it: the path evaluator for barrier curves and the data side data-driven matchers get."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rebasin.checkpoint import Checkpoint
from rebasin.core.errors import ConfigError
from rebasin.data import load_data
from rebasin.evaluate.metrics import IGNORED, activation_features, check_data_fits, task_loss_fns
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

    data = for_head(load_data(plan.name, seed), a, ref, seed)
    factory = ref.factory()
    probe = factory()
    if weights:
        load_into(probe, a.state, a.name, ref.name)
    else:
        check_fits(probe, renamed(probe, a.shapes), a.name, ref.name)
    check_data_fits(probe, data, ref.name)
    return factory, data


CAUSAL = ("ForCausalLM", "LMHeadModel")
MASKED = ("ForMaskedLM",)
MASK_RATE = 0.15


def has_task_head(ref: ModelRef) -> bool:
    """Whether the model answers a task (any built-in or user model; a Hugging Face class named
    ``...For<Task>`` or ``...LMHead...``), rather than returning features (``BertModel``)."""
    head = ref.name.removeprefix("hf:")
    return ref.config is None or re.search(r"(For[A-Z]\w*|LMHead\w*)$", head) is not None


def for_head(data: Any, a: Checkpoint, ref: ModelRef, seed: int) -> Any:
    """The data as the model's head reads it: token ids without labels are a causal LM's next
    tokens, or a masked LM's masked tokens (15% of the positions, seeded); a Hugging Face model
    without a task head cannot measure a barrier, and says what it needs."""
    head = ref.name.removeprefix("hf:") if ref.config is not None else ""
    if not has_task_head(ref):
        raise ConfigError(
            f"{head} has no task head, so it has no loss to measure a barrier with: the barrier "
            "needs the model with its head (config.json architectures ...ForMaskedLM, "
            "...ForSequenceClassification, ...) and data for that task",
            source=a.name,
        )
    if data.task != "lm":
        return data
    if not head or head.endswith(CAUSAL):
        return dataclasses.replace(data, task="next_token")
    if head.endswith(MASKED):
        return _masked(data, _mask_token(a, ref, data), seed)
    raise ConfigError(
        f"token ids without labels measure a language model's loss; config.json names {head}, "
        "which needs labels (add 'labels' to the data file)",
        source=a.name,
    )


def _mask_token(a: Checkpoint, ref: ModelRef, data: Any) -> int:
    """The [MASK] token's id: from config.json, else the tokenizer files beside the weights."""
    cfg = ref.config or {}
    if isinstance(cfg.get("mask_token_id"), int):
        return int(cfg["mask_token_id"])
    folder = a.model_dir
    if folder is not None and (folder / "vocab.txt").is_file():
        words = (folder / "vocab.txt").read_text(errors="replace").splitlines()
        for mark in ("[MASK]", "<mask>"):
            if mark in words:
                return words.index(mark)
    raise ConfigError(
        "masked-LM data needs the mask token's id: none in config.json (mask_token_id) or vocab.txt",
        'add "mask_token_id" to config.json',
        source=a.name,
    )


def _masked(data: Any, mask_id: int, seed: int) -> Any:
    """Masked-LM data: 15% of the real positions (seeded) replaced by the mask token; the labels
    are their ids there and -100 elsewhere."""

    def mask(x: torch.Tensor, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, attn = (x[..., 0], x[..., 1]) if x.dim() == 3 else (x, torch.ones_like(x))
        g = torch.Generator().manual_seed(seed * 7919 + salt)
        chosen = (torch.rand(ids.shape, generator=g) < MASK_RATE) & (attn > 0)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORED))
        masked = torch.where(chosen, torch.full_like(ids, mask_id), ids)
        return (torch.stack([masked, attn], -1) if x.dim() == 3 else masked), labels

    x, y = mask(data.x_train, 0)
    xt, yt = mask(data.x_test, 1)
    return dataclasses.replace(data, x_train=x, y_train=y, x_test=xt, y_test=yt, task="tokens")


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
                task=self.ev.data.task,
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
