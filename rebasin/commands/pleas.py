"""``merge --method pleas``: a new model of a chosen width from A and B (PLeaS: partial matching
and layer-wise least squares). Reads as a straight line: load -> resolve -> spec -> correlate and
match -> choose the merged units -> place the weights -> least squares -> evaluate -> write."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rebasin.checkpoint import Checkpoint
from rebasin.commands.resolve import Run, resolve_run
from rebasin.commands.stages import Timings, finish, outputs_of, pair_report, provenance, run_spec
from rebasin.commands.writing import output_metadata, sub_progress, write_checkpoint
from rebasin.core.errors import ConfigError
from rebasin.core.sizes import parse_size
from rebasin.core.types import PathLike, Progress
from rebasin.data import load_data
from rebasin.data.core import Dataset
from rebasin.evaluate.metrics import activation_features, evaluate
from rebasin.evaluate.repair import reset_batchnorm
from rebasin.evaluate.setup import for_head, has_task_head
from rebasin.matching.activation import assign_correlations, correlations
from rebasin.models.fit import load_into
from rebasin.models.reshape import SHAPES_KEY, changed_shapes, resize_modules
from rebasin.models.resolve import ModelRef, hf_factory
from rebasin.options import Options
from rebasin.permutation import permute
from rebasin.pleas.layout import (
    AxisLayouts,
    Layout,
    axis_layouts,
    choose_merged,
    merged_count,
    new_shapes,
    output_axes,
    widen_state,
)
from rebasin.pleas.lstsq import RIDGE, bias_of, fit_layers, layer_order, weight_of
from rebasin.pleas.widths import group_widths, parse_group_widths
from rebasin.spec.core import PermutationSpec

DEFAULT_WIDTH = 1.5
HEADS_KEY = "rebasin.heads"
"""Metadata of a merge with separate task heads: the class counts of A's and B's heads."""
MLP_NAMES = ("mlp", "intermediate", "output.dense", "ffn", "fc1", "fc2", "c_fc", "c_proj")
"""Names of tensors in a transformer's MLP block (the only part a config.json lets widen)."""
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")


def pleas_checkpoints(
    a_path: PathLike,
    b_path: PathLike,
    out: PathLike | None = None,
    options: Options | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Merge A and B into a model of the chosen width (PLeaS); write it to ``out`` (if given);
    return the report: units merged and kept per group, the least-squares residual per layer,
    and each task's accuracy for A, B, the aligned average, the ensemble, the placed partial
    merge before least squares, and the PLeaS model."""
    opts = options or Options()
    p = opts.pleas
    if p.budget_params is not None and p.width is not None:
        raise ConfigError("give --width or --budget-params, not both")
    out = out if out is not None else opts.output.output
    timings = Timings()
    features_from = opts.evaluate.data or p.data_free
    resolved = dataclasses.replace(opts, evaluate=dataclasses.replace(opts.evaluate, data=features_from))
    with timings("load_s"):
        run = resolve_run("merge", resolved, [a_path, b_path], out)
    a, b = run.checkpoints
    ref = run.model.need()
    with timings("spec_s"):
        spec, source, frozen, _, _ = run_spec(run)
    tasks = _tasks(run, opts, a, ref)
    factory = ref.factory()
    x = _feature_inputs(run, opts, tasks, factory())
    with outputs_of(run):
        with timings("match_s"):
            feats = activation_features(
                factory, spec, x, device=run.device, source=a.name, model_name=ref.name
            )
            costs, batches = correlations(a.state, b.state, spec, feats, progress)
            backend = getattr(run.matcher, "backend", "auto")
            result = assign_correlations(a.state, b.state, spec, costs, backend, {"batches": batches})
        a_state = {k: a.state[k] for k in a.state}
        b_aligned = dict(permute(b.state, spec, result.perm))
        model_a, model_b = factory(), factory()
        load_into(model_a, a_state, a.name, ref.name)
        load_into(model_b, b_aligned, b.name, ref.name)
        out_axes = output_axes(model_a)
        extra = _head_layouts(opts, spec, model_a, x, out_axes)
        widths = _widths(opts, spec, a, extra)
        layouts = _layouts(spec, widths, costs, result.perm)
        laid = axis_layouts(spec, layouts, extra)
        builder = _Builder(ref, a_state, b_aligned, out_axes, a.name)
        bn_x = x if _bn(run) else None
        with timings("evaluate_s"):  # the baselines, where there is a task to score them on
            scored = any(t.name for t in tasks)
            baselines = {
                "average": builder.model(axis_layouts(spec, {}, extra), bn_x),
                "ensemble": _Ensemble(model_a, model_b),
                "placed": builder.model(laid, bn_x),  # the partial merge before least squares
            }
            scores = _scores({"a": model_a, "b": model_b, **baselines}, tasks, extra) if scored else {}
            del baselines
        with timings("fit_s"):
            merged = builder.model(laid)
            fits = fit_layers(
                merged,
                model_a,
                model_b,
                x,
                laid,
                out_axes,
                reset_bn=run.data is not None and run.data.bn != "none",
                progress=progress,
            )
        with timings("evaluate_s", add=True):
            for task, row in _scores({"pleas": merged}, tasks, extra).items():
                scores[task] |= row
        report = pair_report(run, spec, source, frozen, result)
        report["method"] = {"name": "pleas", "options": _described(opts, widths)}
        report["pleas"] = {
            "groups": {
                g: {
                    "size": n,
                    "width": widths[g],
                    "merged": layouts[g].merged if g in layouts else n,
                    "kept": layouts[g].kept if g in layouts else 0,
                    "merged_size": layouts[g].size if g in layouts else n,
                }
                for g, n in spec.sizes.items()
            },
            "task_heads": p.task_heads,
            "parameters": {
                "a": a.num_parameters(),
                "merged": _count(builder.shapes(laid)),
                "merged_nonzero": sum(int(v.count_nonzero()) for v in merged.state_dict().values()),
            },
            "layers": [f.to_dict() for f in fits],
        }
        report["tasks"] = scores
        written: dict[str, list[str]] = {}
        with timings("write_s"):
            if out is not None:
                state = builder.state_of(merged)
                meta = output_metadata(a.metadata, command="merge", **provenance(run, spec, source, "pleas"))
                meta.update(builder.records(laid, widths))
                if extra:
                    meta[HEADS_KEY] = json.dumps([next(iter(extra.values())).kept] * 2)
                files = write_checkpoint(
                    state,
                    out,
                    meta,
                    a,
                    parse_size(opts.output.shard_size),
                    sub_progress(progress, "writing"),
                    config=builder.config(laid),
                )
                written["merged"] = [str(f) for f in files]
        report["output"] = {"files": written}
        report["timings"] = timings.total()
        return finish(report, run)


def _bn(run: Run) -> bool:
    return run.data is not None and run.data.bn != "none"


@dataclasses.dataclass(frozen=True)
class Task:
    """One task the merged model answers: its data and, with separate heads, its logits."""

    name: str
    data: Dataset


def _tasks(run: Run, opts: Options, a: Checkpoint, ref: ModelRef) -> list[Task]:
    """A's task on ``--data`` and, with ``--data-b``, B's task on it (as the model's head reads
    it). Without ``--data`` (data-free), or for a model without a task head (``BertModel``: its
    inputs still give the features), none is scored."""
    seed = run.seed
    if not opts.evaluate.data:
        return []
    if not has_task_head(ref):
        return [Task("", load_data(opts.evaluate.data, seed))]
    out = [Task("a", for_head(load_data(opts.evaluate.data, seed), a, ref, seed))]
    if opts.pleas.data_b:
        out.append(Task("b", for_head(load_data(opts.pleas.data_b, seed), a, ref, seed)))
    elif opts.pleas.task_heads == "separate":
        raise ConfigError("--task-heads separate needs B's task's data: pass --data-b")
    return out


def _feature_inputs(run: Run, opts: Options, tasks: list[Task], probe: nn.Module) -> torch.Tensor:
    """The inputs the matching and the least squares run on: the data-free source's (checked on
    the model), else every task's training inputs."""
    source = opts.pleas.data_free
    if source:
        x = load_data(source, run.seed).x_train
        try:
            with torch.no_grad():
                probe.eval()(x[:2])
        except (RuntimeError, ValueError, IndexError, TypeError):
            raise ConfigError(
                f"--data-free {source}: its inputs (shape {tuple(x.shape[1:])}) do not fit the model",
                "give a source whose inputs have the shape of the tasks' inputs",
            ) from None
        return x
    xs = [t.data.x_train for t in tasks]
    if len({tuple(x.shape[1:]) for x in xs}) > 1:
        raise ConfigError(
            "--data and --data-b have inputs of different shapes",
            "the features for matching come from both: give data sets of one input size",
        )
    return torch.cat(xs)


def _head_layouts(
    opts: Options, spec: PermutationSpec, model: nn.Module, x: torch.Tensor, out_axes: Mapping[str, int]
) -> dict[tuple[str, int], Layout]:
    """With separate task heads: the last layer's outputs, A's then B's (nothing merged)."""
    if opts.pleas.task_heads != "separate":
        return {}
    head = layer_order(model, x[:2])[-1]
    weight = f"{head}.weight"
    axis = out_axes.get(weight, 0)
    if spec.entry(weight, axis) is not None:
        raise ConfigError(
            f"--task-heads separate: the last layer '{head}' outputs a permuted group, not classes",
            "separate heads apply to models whose last layer is a classifier",
        )
    n = int(weight_of(model.get_submodule(head)).shape[axis])
    lay = Layout.apart(n, n)
    out = {(weight, axis): lay}
    if bias_of(model.get_submodule(head)) is not None:
        out[(f"{head}.bias", 0)] = lay
    return out


def _widths(
    opts: Options, spec: PermutationSpec, a: Checkpoint, extra: Mapping[tuple[str, int], Layout]
) -> dict[str, float]:
    """Each group's width from --width, --group-width or --budget-params."""
    p = opts.pleas
    shapes = {k: tuple(s) for k, s in a.shapes.items()}

    def count(widths: Mapping[str, float]) -> int:
        fake = {g: Layout.of(torch.arange(merged_count(n, widths[g])), n) for g, n in spec.sizes.items()}
        return _count(new_shapes(shapes, axis_layouts(spec, fake, extra)))

    overrides = parse_group_widths(p.group_width)
    width = p.width if p.width is not None else DEFAULT_WIDTH
    return group_widths(spec, width, overrides, p.budget_params, count)


def _count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _layouts(
    spec: PermutationSpec,
    widths: Mapping[str, float],
    costs: Mapping[str, Any],
    perm: Mapping[str, torch.Tensor],
) -> dict[str, Layout]:
    """The widened groups' layouts: the best-correlated matched pairs merged."""
    out = {}
    for g, w in widths.items():
        n = spec.sizes[g]
        k = merged_count(n, w)
        if k == n:
            continue
        if g not in costs:
            raise ConfigError(
                f"group '{g}' cannot widen: no module outputs its units, so they have no correlations",
                f"keep it whole: --group-width '{g}=1.0'",
            )
        out[g] = Layout.of(choose_merged(costs[g], perm[g], k), n)
    return out


class _Builder:
    """Merged models and their records, for any layouts of one pair."""

    def __init__(
        self,
        ref: ModelRef,
        a: Mapping[str, torch.Tensor],
        b_aligned: Mapping[str, torch.Tensor],
        out_axes: Mapping[str, int],
        source: str,
    ):
        self.ref, self.a, self.b, self.out_axes, self.source = ref, a, b_aligned, out_axes, source

    def shapes(self, laid: AxisLayouts) -> dict[str, tuple[int, ...]]:
        return new_shapes({k: tuple(v.shape) for k, v in self.a.items()}, laid)

    def config(self, laid: AxisLayouts) -> dict[str, Any] | None:
        """A Hugging Face model's config.json at the merged widths (None for other models)."""
        if self.ref.config is None:
            return None
        old, new = {k: tuple(v.shape) for k, v in self.a.items()}, self.shapes(laid)
        sizes = {new[k][ax] for k, row in laid.items() for ax, item in enumerate(row) if item is not None}
        cfg = dict(self.ref.config)
        if not sizes:
            return cfg
        key = next((k for k in INTERMEDIATE_KEYS if k in cfg), None)
        if len(sizes) > 1 or key is None:
            raise ConfigError(
                "a Hugging Face config.json records one width for every MLP block: give every "
                "widened group the same width (--width, not per-group widths)"
                if key
                else "config.json has no MLP width to record the merged width in",
                source=self.source,
            )
        changed = [k for k in old if old[k] != new[k]]
        if any(not _in_mlp(k) for k in changed):
            raise ConfigError(
                "only the MLP blocks of a Hugging Face model can widen (config.json has one hidden size)",
                source=self.source,
            )
        cfg[key] = sizes.pop()
        return cfg

    def model(self, laid: AxisLayouts, bn_data: torch.Tensor | None = None) -> nn.Module:
        """The placed merge of A and pi(B) at these layouts (BatchNorm statistics reset on
        ``bn_data`` when given)."""
        state = dict(widen_state(self.a, self.b, laid, self.out_axes))
        cfg = self.config(laid)
        if cfg is not None:
            model = hf_factory(cfg)()
        else:
            model = resize_modules(self.ref.factory()(), {k: tuple(v.shape) for k, v in state.items()})
        load_into(model, state, self.source, self.ref.name)
        if bn_data is not None:
            reset_batchnorm(model, bn_data)
        return model.eval()

    def state_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's tensors under the checkpoint's names, in A's dtypes; a tensor the model
        does not persist (a buffer such as a stored ``position_ids``) is A's, as the file had it."""
        key_map = getattr(model, "rebasin_key_map", None) or {}
        own = model.state_dict()
        return {
            k: own[key_map.get(k, k)].detach().to(v.dtype).contiguous() if key_map.get(k, k) in own else v
            for k, v in self.a.items()
        }

    def records(self, laid: AxisLayouts, widths: Mapping[str, float]) -> dict[str, str]:
        """What the output records so later commands rebuild it: the shapes that differ from
        what the architecture builds (not for Hugging Face models: config.json says it)."""
        out = {"rebasin.pleas_widths": json.dumps(widths, sort_keys=True)}
        if self.ref.config is None:
            fresh = dataclasses.replace(self.ref, shapes=()).factory()()
            changed = changed_shapes(fresh, self.shapes(laid))
            out[SHAPES_KEY] = json.dumps(changed, sort_keys=True)
        return out


def _in_mlp(name: str) -> bool:
    return any(t in name for t in MLP_NAMES)


class _Ensemble(nn.Module):
    """The ensemble of A and B: the mean of their logits (twice the compute of either)."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_logits(self.a(x)) + _logits(self.b(x))) * 0.5


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


class _Logits(nn.Module):
    """A model's logits cut to one task's head."""

    def __init__(self, model: nn.Module, part: slice):
        super().__init__()
        self.model, self.part = model, part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.model(x))[..., self.part]


def _scores(
    models: Mapping[str, nn.Module], tasks: list[Task], extra: Mapping[tuple[str, int], Layout]
) -> dict[str, Any]:
    """Each task's test loss and accuracy per model. With separate heads, A answers only A's
    task, B only B's (the ensemble is each task's own model), and the merged models answer each
    with that task's head."""
    out: dict[str, Any] = {}
    n = next(iter(extra.values())).kept if extra else 0
    for i, task in enumerate(t for t in tasks if t.name):  # a task without a head is not scored
        x, y = task.data.x_test, task.data.y_test
        row = {}
        for name, model in models.items():
            if extra and name in ("a", "b", "ensemble"):  # each task answered by its own model
                if name != "ensemble" and name != task.name:
                    continue
                m: nn.Module = models[task.name] if name == "ensemble" else model
            else:
                m = _Logits(model, slice(i * n, (i + 1) * n)) if extra else model
            r = evaluate(m, x, y, task=task.data.task)
            row[name] = {"loss": r.loss, "acc": r.acc}
        out[task.name] = row
    return out


def _described(opts: Options, widths: Mapping[str, float]) -> dict[str, Any]:
    p = opts.pleas
    return {
        "width": p.width if p.width is not None else (None if p.budget_params else DEFAULT_WIDTH),
        "group_width": list(p.group_width),
        "budget_params": p.budget_params,
        "task_heads": p.task_heads,
        "data": opts.evaluate.data,
        "data_b": p.data_b,
        "data_free": p.data_free,
        "ridge": RIDGE,
        "matching": "activation",
    }
