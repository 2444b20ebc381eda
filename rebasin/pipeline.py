"""The top-level story used by the CLI and the API: load -> spec -> match -> permute -> merge -> save."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rebasin._version import __version__
from rebasin.checkpoint import (
    Checkpoint,
    LazyStateDict,
    check_output_path,
    copy_model_files,
    load_checkpoint,
    natural_key,
    parse_size,
    save_checkpoint,
)
from rebasin.errors import CheckpointError, ConfigError, SpecError
from rebasin.matching import match
from rebasin.matching.result import Progress
from rebasin.merge import interpolate
from rebasin.models.resolve import ARCH_KEY, ARGS_KEY, DATA_KEY
from rebasin.permutation import permute, random_permutation
from rebasin.report import input_info, l2_distance, new_report, spec_info
from rebasin.spec.core import PermutationSpec, load_spec
from rebasin.spec.names import infer_spec
from rebasin.spec.registry import list_specs

PathLike = str | os.PathLike[str]


@dataclass
class MergeOptions:
    """Options of ``rebasin merge`` (see docs/cli.md)."""

    method: str = "weight"
    alpha: float = 0.5
    spec: str = "auto"
    seed: int = 0
    restarts: int = 1
    max_iter: int = 100
    device: str = "cpu"
    backend: str = "auto"
    shard_size: str | int | None = None
    force: bool = False
    save_permuted: PathLike | None = None
    cost: str = "l2"
    steps: int | None = None
    epochs: int | None = None
    lr: float | None = None
    estimator: str = "st"
    freeze: Sequence[str] = ()
    model: str | None = None
    model_args: str | dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- checks


def _fmt_shape(s: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def _names(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_pair(a: Checkpoint, b: Checkpoint) -> None:
    """Both checkpoints must hold the same tensor names and shapes."""
    missing = sorted(set(a.shapes) - set(b.shapes), key=natural_key)
    if missing:
        raise CheckpointError(f"tensors missing that A has: {_names(missing)}", source=b.name)
    extra = sorted(set(b.shapes) - set(a.shapes), key=natural_key)
    if extra:
        raise CheckpointError(f"tensors missing that B has: {_names(extra)}", source=a.name)
    for k in sorted(a.shapes, key=natural_key):
        if a.shapes[k] != b.shapes[k]:
            raise CheckpointError(
                f"tensor '{k}' has shape {_fmt_shape(b.shapes[k])}, A has {_fmt_shape(a.shapes[k])}",
                source=b.name,
            )


def check_weights(ck: Checkpoint, spec: PermutationSpec | None = None) -> None:
    """Weights must be floating point and finite."""
    touched = set(spec.params) if spec else set()
    for k in ck.state:
        dt = ck.dtypes[k]
        is_float = dt.is_floating_point
        if not is_float and (k in touched or k.endswith((".weight", ".bias")) or k in ("weight", "bias")):
            raise CheckpointError(
                f"tensor '{k}' has integer dtype {str(dt).removeprefix('torch.')}; "
                "weights must be floating point",
                source=ck.name,
            )
        if is_float:
            t = ck.state[k]
            if not bool(torch.isfinite(t).all()):
                what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise CheckpointError(f"tensor '{k}' contains {what} values", source=ck.name)


def freeze_groups(spec: PermutationSpec, patterns: Sequence[str]) -> tuple[PermutationSpec, list[str]]:
    """Hold the groups matching any glob pattern (``residual``, ``layers.*.attn.*``) at identity."""
    import fnmatch

    frozen: list[str] = []
    for pat in patterns:
        hit = [g for g in spec.sizes if fnmatch.fnmatchcase(g, pat)]
        if not hit:
            names = list(spec.sizes)
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ConfigError(f"--freeze '{pat}' matches no group (groups: {shown})")
        frozen += [g for g in hit if g not in frozen]
    if not frozen:
        return spec, []
    out = spec.without(frozen)
    if not out.sizes:
        raise ConfigError("--freeze leaves no group free to move; nothing to align")
    return out, frozen


def traced_spec(
    ck: Checkpoint, model: str | None, model_args: str | dict[str, Any] | None, data: str | None = None
) -> tuple[PermutationSpec, str]:
    """Build the model (``--model``, else the architecture ``ck`` records), check that it fits
    the checkpoint, and trace it for its spec."""
    from rebasin.evaluate import check_fits, renamed
    from rebasin.models.resolve import DATA_KEY, resolve_model
    from rebasin.spec.trace import trace_spec

    ref = resolve_model(model, model_args, ck.metadata, ck.name, ck.config)
    m = ref.factory()()
    # checkpoint names -> the model's own, where they differ
    check_fits(m, renamed(m, ck.shapes), ck.name, ref.name, made="made")
    inputs = None
    data = data or ck.metadata.get(DATA_KEY)
    if getattr(m, "example_input", None) is None and data:
        from rebasin.data import load_data

        inputs = (load_data(data).x_train[:2],)
    s = trace_spec(m, inputs, name=ref.name)
    back = {v: k for k, v in getattr(m, "rebasin_key_map", {}).items()}
    s = s.renamed(back).restricted(ck.shapes)  # checkpoint names; tied aliases it stores once
    problems = s.problems(ck.shapes)
    if problems:  # cannot happen when the model fits; kept as a guard
        raise SpecError(problems, source=ck.name)
    return s, f"traced:{ref.name}"


def spec_config(ck: Checkpoint) -> dict[str, Any] | None:
    """What name-based inference may know beyond shapes: a Hugging Face config.json, or the head
    count of rebasin's own transformer from the architecture the checkpoint records."""
    if ck.config is not None:
        return ck.config
    if ck.metadata.get(ARCH_KEY) == "transformer":
        import inspect

        from rebasin.models.transformer import Transformer

        try:
            args = json.loads(ck.metadata.get(ARGS_KEY, "{}"))
        except ValueError:
            return None
        default = inspect.signature(Transformer).parameters["heads"].default
        return {"num_attention_heads": args.get("heads", default)}
    return None


def resolve_spec(
    spec: str | PermutationSpec,
    ck: Checkpoint,
    model: str | None = None,
    model_args: str | dict[str, Any] | None = None,
    data: str | None = None,
) -> tuple[PermutationSpec, str]:
    """A spec from ``auto`` (traced from ``model`` when one is given, else inferred from names),
    ``trace`` (the model, or the architecture the checkpoint records), a family name, a spec
    file, or a PermutationSpec."""
    if isinstance(spec, PermutationSpec):
        s, source = spec, "given"
    elif spec == "trace" or (spec == "auto" and model):
        s, source = traced_spec(ck, model, model_args, data)
    elif spec == "auto":
        s = infer_spec(ck.shapes, order=ck.order, source=ck.name, config=spec_config(ck))
        source = f"inferred:{s.family}"
    elif spec in {f.name for f in list_specs()}:
        s = infer_spec(ck.shapes, spec, order=ck.order, source=ck.name, config=spec_config(ck))
        source = f"family:{spec}"
    elif Path(spec).suffix in (".yaml", ".yml", ".json") or os.sep in spec or Path(spec).exists():
        s = load_spec(spec)
        source = f"file:{spec}"
        problems = s.problems(ck.shapes)
        if problems:
            raise SpecError(problems, "the spec does not fit this checkpoint", source=spec)
    else:
        infer_spec(ck.shapes, spec)  # raises the unknown-family error with suggestions
        raise ConfigError(f"unknown spec '{spec}'")
    if not s.sizes:
        raise SpecError("the spec has no permutation groups; nothing to align", source=ck.name)
    return s, source


_KEEP = ("rebasin.arch", "rebasin.arch_args", "rebasin.data")


def _metadata(base: dict[str, str], **items: Any) -> dict[str, str]:
    out = {k: v for k, v in base.items() if not k.startswith("rebasin.") or k in _KEEP}
    out.setdefault("format", "pt")  # what Hugging Face loaders expect of a PyTorch safetensors file
    out["rebasin.version"] = __version__
    out.update({f"rebasin.{k}": str(v) for k, v in items.items() if v is not None})
    return out


def write_checkpoint(
    state: Any,
    out: PathLike,
    meta: dict[str, str],
    like: Checkpoint,
    shard: int | None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``state`` like the input ``like``: into a directory, a Hugging Face input's
    config, tokenizer and other non-weight files come along, so ``from_pretrained`` loads it."""
    if like.config is not None:
        state = _untie(state, like)
    files = save_checkpoint(state, out, meta, shard_size=shard, progress=progress)
    out_p = Path(out)
    if like.model_dir is not None and out_p.is_dir():
        files += copy_model_files(like.model_dir, out_p)
    return files


_TIED = (
    ("lm_head.weight", ("embed_tokens.weight", "wte.weight")),
    ("cls.predictions.decoder.weight", ("word_embeddings.weight",)),
)


def _untie(state: Any, like: Checkpoint) -> Any:
    """Drop an output head tied to the input embedding (config ``tie_word_embeddings``): Hugging
    Face stores tied weights once and re-ties them on load."""
    assert like.config is not None
    if like.config.get("tie_word_embeddings", True) is False:
        return state
    drop = []
    for head, embeds in _TIED:
        emb = [k for k in state if k.endswith(embeds) and k != head]
        if head in state and len(emb) == 1 and torch.equal(like.state[head], like.state[emb[0]]):
            drop.append(head)
    if not drop:
        return state
    return LazyStateDict([k for k in state if k not in drop], lambda k: state[k])


# ------------------------------------------------------------------------------- commands


def merge_checkpoints(
    a_path: PathLike,
    b_path: PathLike,
    out: PathLike | None,
    options: MergeOptions | None = None,
    progress: Progress | None = None,
    evaluation: EvalOptions | None = None,
) -> dict[str, Any]:
    """Align B to A, write ``(1 - alpha) A + alpha pi(B)`` to ``out`` (if given); return the report.

    With ``evaluation``, also measure the naive and aligned paths (the barrier) and apply its
    BatchNorm mode (reset or REPAIR) to the merged checkpoint."""
    opt = options or MergeOptions()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if not 0.0 <= opt.alpha <= 1.0:
        raise ConfigError(f"--alpha must lie in [0, 1], got {opt.alpha}")
    shard = parse_size(opt.shard_size)
    outputs = [p for p in (out, opt.save_permuted) if p is not None]
    for o in outputs:
        check_output_path(o, [a_path, b_path], opt.force)
    if (
        out is not None
        and opt.save_permuted is not None
        and Path(out).resolve() == Path(opt.save_permuted).resolve()
    ):
        raise ConfigError("--save-permuted must differ from the output path")

    t = time.perf_counter()
    a = load_checkpoint(a_path)
    b = load_checkpoint(b_path)
    check_pair(a, b)
    timings["load_s"] = time.perf_counter() - t
    if evaluation is not None and evaluation.optional and not (evaluation.data or DATA_KEY in a.metadata):
        evaluation = None

    t = time.perf_counter()
    spec, source = resolve_spec(
        opt.spec, a, opt.model, opt.model_args, evaluation.data if evaluation else None
    )
    spec, frozen = freeze_groups(spec, opt.freeze)
    check_weights(a, spec)
    check_weights(b, spec)
    timings["spec_s"] = time.perf_counter() - t
    check_data_available(opt, a, evaluation)
    # one evaluator serves both the data-driven matcher and the barrier curves
    ev = make_evaluator(a, evaluation or EvalOptions(), opt.seed) if evaluation or needs_data(opt) else None

    result = _align(opt, a, b, spec, ev, progress)
    timings["match_s"] = result.seconds

    b_aligned = permute(b.state, spec, result.perm)
    report = new_report("merge")
    report["inputs"] = {"a": input_info(a), "b": input_info(b)}
    report["spec"] = spec_info(spec, source, list(a.state)) | {"frozen": frozen}
    report["method"] = {"name": opt.method, "options": result.options}
    report["match"] = result.to_dict()
    t = time.perf_counter()
    report["distance"] = {
        "l2_before": l2_distance(a.state, b.state),
        "l2_after": l2_distance(a.state, b_aligned),
    }
    timings["distance_s"] = time.perf_counter() - t

    written: dict[str, list[str]] = {}
    common: dict[str, Any] = {
        "method": opt.method,
        "seed": opt.seed,
        "spec": source,
        "spec_digest": spec.digest(),
        "input_a.sha256": report["inputs"]["a"]["sha256"],
        "input_b.sha256": report["inputs"]["b"]["sha256"],
    }
    if ev is not None and evaluation is not None:
        from rebasin.barrier import alpha_grid

        t = time.perf_counter()
        grid = alpha_grid(evaluation.alphas)
        curves = {
            "naive": ev.curve(a.state, b.state, grid, progress, "naive"),
            "aligned": ev.curve(a.state, b_aligned, grid, progress, "aligned"),
        }
        report["evaluation"] = _evaluation_report(ev, curves)
        timings["evaluate_s"] = time.perf_counter() - t
        common["bn"] = ev.bn
    t = time.perf_counter()
    if out is not None:
        if ev is not None and evaluation is not None and ev.bn != "none":
            merged: Any = ev.merged_state(a.state, b_aligned, opt.alpha)
        else:
            merged = interpolate(a.state, b_aligned, opt.alpha)
        meta = _metadata(a.metadata, command="merge", alpha=opt.alpha, **common)
        files = write_checkpoint(merged, out, meta, a, shard, _sub(progress, "writing"))
        written["merged"] = [str(f) for f in files]
    if opt.save_permuted is not None:
        meta = _metadata(b.metadata, command="align", **common)
        files = write_checkpoint(b_aligned, opt.save_permuted, meta, b, shard)
        written["permuted"] = [str(f) for f in files]
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    report["output"] = {"alpha": opt.alpha, "files": written}
    report["timings"] = {k: round(v, 4) for k, v in timings.items()}
    return report


def permute_checkpoint(
    path: PathLike,
    out: PathLike,
    seed: int,
    spec: str | PermutationSpec = "auto",
    *,
    force: bool = False,
    shard_size: str | int | None = None,
    model: str | None = None,
    model_args: str | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a random function-preserving permutation of a checkpoint; return the report."""
    check_output_path(out, [path], force)
    ck = load_checkpoint(path)
    s, source = resolve_spec(spec, ck, model, model_args)
    check_weights(ck, s)
    perm = random_permutation(s, seed)
    meta = _metadata(ck.metadata, command="permute", seed=seed, spec=source, spec_digest=s.digest())
    files = write_checkpoint(permute(ck.state, s, perm), out, meta, ck, parse_size(shard_size))
    report = new_report("permute")
    report["inputs"] = {"a": input_info(ck)}
    report["spec"] = spec_info(s, source, list(ck.state))
    report["seed"] = seed
    report["moved_fraction"] = {g: float((p != torch.arange(len(p))).float().mean()) for g, p in perm.items()}
    report["output"] = {"files": [str(f) for f in files]}
    return report


def merge_many_checkpoints(
    paths: Sequence[PathLike],
    out: PathLike,
    *,
    spec: str | PermutationSpec = "auto",
    seed: int = 0,
    max_rounds: int = 20,
    device: str = "cpu",
    force: bool = False,
    shard_size: str | int | None = None,
    progress: Progress | None = None,
    freeze: Sequence[str] = (),
) -> dict[str, Any]:
    """Align N checkpoints to a common reference (MergeMany) and write the mean of the aligned models."""
    from rebasin.matching import MergeMany
    from rebasin.merge import average

    if len(paths) < 2:
        raise ConfigError("merge-many needs at least two checkpoints")
    check_output_path(out, paths, force)
    cks = [load_checkpoint(p) for p in paths]
    for ck in cks[1:]:
        check_pair(cks[0], ck)
    s, source = resolve_spec(spec, cks[0])
    s, frozen = freeze_groups(s, freeze)
    for ck in cks:
        check_weights(ck, s)
    result = MergeMany(max_rounds=max_rounds, seed=seed, device=device).match(
        [c.state for c in cks], s, progress
    )
    aligned = [permute(c.state, s, p) for c, p in zip(cks, result.perms, strict=True)]
    meta = _metadata(
        cks[0].metadata,
        command="merge-many",
        method="merge-many",
        seed=seed,
        spec=source,
        spec_digest=s.digest(),
        models=len(cks),
    )
    files = write_checkpoint(average(aligned), out, meta, cks[0], parse_size(shard_size))
    report = new_report("merge-many")
    report["inputs"] = [input_info(c) for c in cks]
    report["spec"] = spec_info(s, source, list(cks[0].state)) | {"frozen": frozen}
    report["merge_many"] = result.to_dict()
    report["output"] = {"files": [str(f) for f in files]}
    return report


def describe_spec(
    path: PathLike,
    spec: str = "auto",
    model: str | None = None,
    model_args: str | dict[str, Any] | None = None,
) -> tuple[PermutationSpec, str, list[str]]:
    """The spec of a checkpoint, where it came from, and the tensors it leaves fixed."""
    ck = load_checkpoint(path)
    s, source = resolve_spec(spec, ck, model, model_args)
    return s, source, s.fixed(list(ck.state))


def inspect_checkpoint(path: PathLike) -> dict[str, Any]:
    """Tensors, shapes, dtypes, parameter count, metadata and the recognized family."""
    ck = load_checkpoint(path)
    info = new_report("inspect")
    info["input"] = input_info(ck, with_hash=False)
    info["files"] = [str(f) for f in ck.files]
    info["metadata"] = dict(sorted(ck.metadata.items()))
    info["tensors"] = [
        {"name": k, "shape": list(ck.shapes[k]), "dtype": str(ck.dtypes[k]).removeprefix("torch.")}
        for k in ck.state
    ]
    try:
        s = infer_spec(ck.shapes, order=ck.order, config=spec_config(ck))
        info["family"] = s.family
        info["groups"] = len(s.sizes)
    except SpecError:
        info["family"] = None
    return info


def _sub(progress: Progress | None, desc: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(desc, done, total)


# ------------------------------------------------------------------------------- evaluation


@dataclass
class EvalOptions:
    """What ``barrier`` (and ``merge --data``) evaluate on (see docs/cli.md)."""

    data: str | None = None
    model: str | None = None
    model_args: str | dict[str, Any] | None = None
    alphas: int = 25
    bn: str = "auto"
    batch_size: int = 1000
    max_train: int | None = None
    device: str = "cpu"
    optional: bool = False
    """Skip the evaluation (rather than fail) when no data is known: ``merge --model`` alone."""


def make_evaluator(a: Checkpoint, opt: EvalOptions, seed: int = 0) -> Any:
    """A PathEvaluator for A's architecture on the chosen data, checked against both."""
    from rebasin.barrier import PathEvaluator
    from rebasin.data import load_data
    from rebasin.evaluate import check_data_fits, load_into
    from rebasin.models.resolve import DATA_KEY, resolve_model
    from rebasin.repair import has_batchnorm

    ref = resolve_model(opt.model, opt.model_args, a.metadata, a.name, a.config)
    data_arg = opt.data or a.metadata.get(DATA_KEY)
    if not data_arg:
        raise ConfigError(
            "no data: pass --data (mnist1d, digits, synthetic, a .safetensors/.npz file, or MODULE:FUNCTION)",
            source=a.name,
        )
    data = load_data(data_arg, seed)
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
    bn = opt.bn
    if bn == "auto":
        bn = "reset" if has_batchnorm(probe) else "none"
    ev = PathEvaluator(
        factory,
        data,
        bn=bn,
        batch_size=opt.batch_size,
        max_train=opt.max_train,
        device=opt.device,
        model_name=ref.name,
        model_args=ref.args,
    )
    return ev


def _evaluation_report(ev: Any, curves: dict[str, Any]) -> dict[str, Any]:
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
    return out


def needs_data(opt: MergeOptions) -> bool:
    """Whether the matching method runs the models on data."""
    from rebasin.matching import DATA_METHODS

    return opt.method in DATA_METHODS or (opt.method == "sinkhorn" and opt.cost != "l2")


def check_data_available(opt: MergeOptions, a: Checkpoint, evaluation: EvalOptions | None) -> None:
    """For data-driven methods: say exactly what is missing (data, or a model definition)."""
    from rebasin.models.resolve import ARCH_KEY, DATA_KEY

    if not needs_data(opt):
        return
    what = f"method '{opt.method}'" + (f" with cost '{opt.cost}'" if opt.method == "sinkhorn" else "")
    eo = evaluation or EvalOptions()
    if not (eo.data or a.metadata.get(DATA_KEY)):
        raise ConfigError(
            f"{what} needs data to run both models on: pass --data (mnist1d, digits, "
            "synthetic, a .safetensors/.npz file, or MODULE:FUNCTION)",
            source=a.name,
        )
    if not (eo.model or ARCH_KEY in a.metadata or a.config is not None):
        raise ConfigError(
            f"{what} runs the models: pass --model NAME or MODULE:FACTORY "
            "(the checkpoint records no architecture)",
            source=a.name,
        )


def data_callables(opt: MergeOptions, a: Checkpoint, spec: PermutationSpec, ev: Any) -> dict[str, Any]:
    """What data-driven methods receive from the model and data side (through the evaluator
    ``ev``): ``features`` (activation matching), ``task_loss`` (STE, Sinkhorn mid/rnd) and
    ``score`` (STE). Empty for data-free runs."""
    from rebasin.evaluate import activation_features, task_loss_fns

    if not needs_data(opt):
        return {}
    x, y = ev.data.x_train, ev.data.y_train
    if ev.max_train:
        x, y = x[: ev.max_train], y[: ev.max_train]
    if opt.method == "activation":
        return {
            "features": activation_features(
                ev.make_model, spec, x, device=ev.device, source=a.name, model_name=ev.model_name
            )
        }
    batch_size = 256
    task_loss, score = task_loss_fns(
        ev.make_model, a.state, x, y, batch_size=batch_size, seed=opt.seed, device=ev.device
    )
    out: dict[str, Any] = {"task_loss": task_loss}
    if opt.method == "ste":
        out["score"] = score
    if opt.epochs:  # passes over the training data, in mini-batch steps
        out["steps"] = opt.epochs * max(1, -(-len(y) // batch_size))
    return out


def _align(
    opt: MergeOptions, a: Checkpoint, b: Checkpoint, spec: PermutationSpec, ev: Any, progress: Progress | None
) -> Any:
    """Run the configured matching method (with the data side where it needs one)."""
    if opt.estimator != "st" and opt.method != "ste":
        raise ConfigError(f"--estimator {opt.estimator} applies to --method ste only")
    return match(
        a.state,
        b.state,
        spec,
        opt.method,
        progress=progress,
        cost=opt.cost,
        lr=opt.lr,
        **({"estimator": opt.estimator} if opt.method == "ste" else dict[str, Any]()),
        **({"steps": opt.steps} | data_callables(opt, a, spec, ev)),
        seed=opt.seed,
        restarts=opt.restarts,
        max_iter=opt.max_iter,
        device=opt.device,
        backend=opt.backend,
        **opt.extra,
    )


def gate_value(report: dict[str, Any]) -> float | None:
    """The number ``--max-barrier`` is compared with: the test loss barrier (linear definition)
    of the aligned path (of the naive path when nothing was aligned)."""
    ev = report.get("evaluation")
    if not ev:
        return None
    path = "aligned" if "aligned" in ev["paths"] else "naive"
    return float(ev["paths"][path]["barriers"]["test"]["loss"]["linear"])


def barrier_checkpoints(
    a_path: PathLike,
    b_path: PathLike,
    options: MergeOptions | None = None,
    evaluation: EvalOptions | None = None,
    align: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Loss/accuracy along the naive path and (when ``align``) the aligned path; return the report."""
    from rebasin.barrier import alpha_grid

    opt = options or MergeOptions()
    ev_opt = evaluation or EvalOptions()
    t0 = time.perf_counter()
    alphas = alpha_grid(ev_opt.alphas)
    a = load_checkpoint(a_path)
    b = load_checkpoint(b_path)
    check_pair(a, b)
    report = new_report("barrier")
    report["inputs"] = {"a": input_info(a), "b": input_info(b)}
    ev = make_evaluator(a, ev_opt, opt.seed)
    curves = {}
    if align:
        spec, source = resolve_spec(opt.spec, a, opt.model, opt.model_args, ev_opt.data)
        spec, frozen = freeze_groups(spec, opt.freeze)
        check_weights(a, spec)
        check_weights(b, spec)
        result = _align(opt, a, b, spec, ev, progress)
        report["spec"] = spec_info(spec, source, list(a.state)) | {"frozen": frozen}
        report["method"] = {"name": opt.method, "options": result.options}
        report["match"] = result.to_dict()
        b_aligned = permute(b.state, spec, result.perm)
    else:
        check_weights(a)
        check_weights(b)
        report["method"] = {"name": "none"}
    curves["naive"] = ev.curve(a.state, b.state, alphas, progress, "naive")
    if align:
        curves["aligned"] = ev.curve(a.state, b_aligned, alphas, progress, "aligned")
    report["evaluation"] = _evaluation_report(ev, curves)
    report["timings"] = {"total_s": round(time.perf_counter() - t0, 4)}
    return report
