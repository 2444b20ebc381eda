"""Run a model on data: loss and accuracy; load state dicts into models with clear errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from rebasin.core.errors import ConfigError
from rebasin.data.core import Dataset, batches
from rebasin.models.fit import load_into, renamed
from rebasin.spec.core import Axis, PermutationSpec


@dataclass(frozen=True)
class Metrics:
    """Mean cross-entropy loss and accuracy over a data split."""

    loss: float
    acc: float


IGNORED = -100
"""The label of positions that count in neither loss nor accuracy (padding, unmasked tokens)."""


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, task: str = "classes"
) -> Metrics:
    """Loss and accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    total, correct, n = evaluation_sums(model, x, y, batch_size, task)
    return Metrics(total / n, correct / n)


@torch.no_grad()
def evaluation_sums(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, task: str = "classes"
) -> tuple[float, int, int]:
    """Summed loss, correct predictions and counted targets of ``model`` on ``(x, y)``: shards of
    a data set add up to the whole. Targets labelled -100 count in neither."""
    model.eval()
    device = next(model.parameters()).device
    total, correct, n = 0.0, 0, 0
    for xb, yb in batches(x, y, batch_size):
        out, yb = logits_and_targets(model(xb.to(device)), yb.to(device), task)
        out = out.float()
        counted = yb != IGNORED
        total += float(nn.functional.cross_entropy(out, yb, reduction="sum", ignore_index=IGNORED))
        correct += int(((out.argmax(1) == yb) & counted).sum())
        n += int(counted.sum())
    return total, correct, n


def logits_and_targets(out: Any, y: torch.Tensor, task: str = "classes") -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits (rows, classes) and their targets from a model's output (a tensor, or a
    Hugging Face output with ``.logits``), by task (``rebasin.data.core.TASKS``): ``classes``
    gives (N, C) for labels (N,); ``next_token`` (N, T, V) for the input ids, position t
    predicting token t + 1; ``tokens`` (N, T, C) for labels (N, T)."""
    if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
        out = out.logits
    if task == "next_token" and out.dim() == 3:
        return out[:, :-1].reshape(-1, out.shape[-1]), y[:, 1:].reshape(-1)
    if task == "tokens" and out.dim() == 3:
        return out.reshape(-1, out.shape[-1]), y.reshape(-1)
    return out, y


def check_data_fits(model: nn.Module, data: Dataset, model_name: str) -> None:
    """One forward pass on two examples: inputs must fit, outputs must cover every label."""
    x = data.x_train[:2]
    try:
        with torch.no_grad():
            out = model.eval()(x.to(next(model.parameters()).device))
        out, _ = logits_and_targets(out, data.y_train[:2], data.task)  # shapes only
    except (RuntimeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(
            f"inputs of shape {tuple(data.input_shape)} do not fit model '{model_name}' ({first})",
            source=data.name,
        ) from None
    if out.dim() != 2:
        raise ConfigError(
            f"model '{model_name}' gives outputs of shape {tuple(out.shape[1:])} per example; "
            "expected class logits",
            source=data.name,
        )
    if out.shape[1] < data.num_classes:
        raise ConfigError(
            f"labels go up to {data.num_classes - 1} but model '{model_name}' has {out.shape[1]} outputs",
            source=data.name,
        )


def transposed_dense(m: nn.Module) -> bool:
    """A dense layer stored (inputs, outputs): Hugging Face's ``Conv1D`` (GPT-2)."""
    return type(m).__name__ == "Conv1D" and not isinstance(m, nn.Conv1d)


def channel_rows(m: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A module's output as (rows, channels): channels are the last axis for dense layers,
    LayerNorm and embeddings, axis 1 for convolutions and Batch/GroupNorm."""
    last = isinstance(m, nn.Linear | nn.LayerNorm | nn.Embedding) or transposed_dense(m)
    axis = out.dim() - 1 if last else 1
    return out.detach().movedim(axis, -1).reshape(-1, out.shape[axis])


def activation_features(
    make_model: Callable[[], nn.Module],
    spec: PermutationSpec,
    x: torch.Tensor,
    batch_size: int = 500,
    device: str = "cpu",
    source: str = "checkpoint",
    model_name: str = "model",
) -> Callable[[Mapping[str, torch.Tensor]], Iterator[dict[str, list[torch.Tensor]]]]:
    """A features function for activation matching: runs a state dict on ``x`` (fixed order) and
    yields, per batch, each group's tap outputs as (rows, units). Taps are the modules whose weight
    axis 0 belongs to a group (layer outputs and the norms that follow them)."""

    def features(state: Mapping[str, torch.Tensor]) -> Iterator[dict[str, list[torch.Tensor]]]:
        model = make_model().to(device)
        load_into(model, state, source, model_name)
        model.eval()
        taps = []
        for name, m in model.named_modules():
            # the axis of the weight that indexes the layer's outputs (1 for GPT-2's Conv1D)
            e = spec.entry(f"{name}.weight", int(transposed_dense(m))) if name else None
            kinds = (
                nn.Linear,
                nn.Conv1d,
                nn.Conv2d,
                nn.BatchNorm1d,
                nn.BatchNorm2d,
                nn.LayerNorm,
                nn.GroupNorm,
            )
            if isinstance(e, Axis) and e.inner == 1 and (isinstance(m, kinds) or transposed_dense(m)):
                taps.append((name, m, e.group))
        if not taps:
            raise ConfigError(f"no module of model '{model_name}' outputs a permuted group", source=source)
        current: dict[str, list[torch.Tensor]] = {}

        def make_hook(group: str) -> Callable[..., None]:
            def hook(mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
                current.setdefault(group, []).append(channel_rows(mod, out))

            return hook

        handles = [m.register_forward_hook(make_hook(g)) for _, m, g in taps]
        try:
            for xb, _ in batches(x, torch.zeros(len(x)), batch_size):
                current.clear()
                with torch.no_grad():  # never held across a yield: grad mode is thread-global
                    model(xb.to(device))
                yield dict(current)
        finally:
            for h in handles:
                h.remove()

    return features


def task_loss_fns(
    make_model: Callable[[], nn.Module],
    reference: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "cpu",
    score_examples: int = 2000,
    batch_stats: bool = False,
    task: str = "classes",
) -> tuple[
    Callable[[dict[str, torch.Tensor], int], torch.Tensor], Callable[[dict[str, torch.Tensor]], float]
]:
    """Differentiable task loss of a model given as a dict of float tensors (``task_loss(params,
    step)`` on the step's mini-batch, cycling through shuffled data) and a no-grad ``score(params)``
    on the first ``score_examples`` examples. Tensors missing from ``params`` (integer buffers)
    come from ``reference``.

    With ``batch_stats``, BatchNorm layers normalize with the statistics of the batch at hand
    (train mode for them alone; dropout stays off) instead of the stored running statistics:
    what a barrier measured after a BatchNorm reset sees. ``score`` then takes its examples as
    one batch, which equals resetting the statistics on them and evaluating."""

    model = make_model().to(device).eval()
    if batch_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    fixed = {k: v.to(device) for k, v in reference.items() if not v.is_floating_point()}
    buffers = {name for name, _ in model.named_buffers()}

    def call(params: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        # buffers (BatchNorm running statistics) take values, never gradients; copies, since
        # BatchNorm in train mode updates them in place
        full = {**fixed, **{k: v.detach().clone() if k in buffers else v for k, v in params.items()}}
        full = dict(renamed(model, full))
        return functional_call(model, full, (xb,))

    n = len(y)
    per_epoch = max(1, (n + batch_size - 1) // batch_size)

    def task_loss(params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        idx = order[i * batch_size : (i + 1) * batch_size]
        out, yb = logits_and_targets(call(params, x[idx].to(device)), y[idx].to(device), task)
        return nn.functional.cross_entropy(out, yb, ignore_index=IGNORED)

    def score(params: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            xs, ys = x[:score_examples].to(device), y[:score_examples].to(device)
            out, ys = logits_and_targets(call(params, xs), ys, task)
            return float(nn.functional.cross_entropy(out, ys, ignore_index=IGNORED))

    return task_loss, score
