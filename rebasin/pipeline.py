"""The top-level story used by the CLI and the API: load -> spec -> match -> permute -> merge -> save."""

from __future__ import annotations

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
    check_output_path,
    load_checkpoint,
    natural_key,
    parse_size,
    save_checkpoint,
)
from rebasin.errors import CheckpointError, ConfigError, SpecError
from rebasin.match import match
from rebasin.match.result import Progress
from rebasin.merge import interpolate
from rebasin.permute import permute, random_permutation
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


def resolve_spec(spec: str | PermutationSpec, ck: Checkpoint) -> tuple[PermutationSpec, str]:
    """A spec from ``auto`` (inference), a family name, a spec file, or a PermutationSpec."""
    if isinstance(spec, PermutationSpec):
        s, source = spec, "given"
    elif spec == "auto":
        s = infer_spec(ck.shapes, order=ck.order, source=ck.name)
        source = f"inferred:{s.family}"
    elif spec in {f.name for f in list_specs()}:
        s = infer_spec(ck.shapes, spec, order=ck.order, source=ck.name)
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


def _metadata(base: dict[str, str], **items: Any) -> dict[str, str]:
    out = {k: v for k, v in base.items() if not k.startswith("rebasin.")}
    out["rebasin.version"] = __version__
    out.update({f"rebasin.{k}": str(v) for k, v in items.items() if v is not None})
    return out


# ------------------------------------------------------------------------------- commands


def merge_checkpoints(
    a_path: PathLike,
    b_path: PathLike,
    out: PathLike | None,
    options: MergeOptions | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Align B to A, write ``(1 - alpha) A + alpha pi(B)`` to ``out`` (if given); return the report."""
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

    t = time.perf_counter()
    spec, source = resolve_spec(opt.spec, a)
    check_weights(a, spec)
    check_weights(b, spec)
    timings["spec_s"] = time.perf_counter() - t

    result = match(
        a.state,
        b.state,
        spec,
        opt.method,
        progress=progress,
        seed=opt.seed,
        restarts=opt.restarts,
        max_iter=opt.max_iter,
        device=opt.device,
        backend=opt.backend,
        **opt.extra,
    )
    timings["match_s"] = result.seconds

    b_aligned = permute(b.state, spec, result.perm)
    report = new_report("merge")
    report["inputs"] = {"a": input_info(a), "b": input_info(b)}
    report["spec"] = spec_info(spec, source, list(a.state))
    report["method"] = {"name": opt.method, "options": result.options}
    report["match"] = result.to_dict()
    t = time.perf_counter()
    report["distance"] = {
        "l2_before": l2_distance(a.state, b.state),
        "l2_after": l2_distance(a.state, b_aligned),
    }
    timings["distance_s"] = time.perf_counter() - t

    written: dict[str, list[str]] = {}
    t = time.perf_counter()
    common = {
        "method": opt.method,
        "seed": opt.seed,
        "spec": source,
        "spec_digest": spec.digest(),
        "input_a.sha256": report["inputs"]["a"]["sha256"],
        "input_b.sha256": report["inputs"]["b"]["sha256"],
    }
    if out is not None:
        merged = interpolate(a.state, b_aligned, opt.alpha)
        meta = _metadata(a.metadata, command="merge", alpha=opt.alpha, **common)
        files = save_checkpoint(merged, out, meta, shard_size=shard, progress=_sub(progress, "writing"))
        written["merged"] = [str(f) for f in files]
    if opt.save_permuted is not None:
        meta = _metadata(b.metadata, command="align", **common)
        files = save_checkpoint(b_aligned, opt.save_permuted, meta, shard_size=shard)
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
) -> dict[str, Any]:
    """Write a random function-preserving permutation of a checkpoint; return the report."""
    check_output_path(out, [path], force)
    ck = load_checkpoint(path)
    s, source = resolve_spec(spec, ck)
    check_weights(ck, s)
    perm = random_permutation(s, seed)
    meta = _metadata(ck.metadata, command="permute", seed=seed, spec=source, spec_digest=s.digest())
    files = save_checkpoint(permute(ck.state, s, perm), out, meta, shard_size=parse_size(shard_size))
    report = new_report("permute")
    report["inputs"] = {"a": input_info(ck)}
    report["spec"] = spec_info(s, source, list(ck.state))
    report["seed"] = seed
    report["moved_fraction"] = {g: float((p != torch.arange(len(p))).float().mean()) for g, p in perm.items()}
    report["output"] = {"files": [str(f) for f in files]}
    return report


def describe_spec(path: PathLike, spec: str = "auto") -> tuple[PermutationSpec, str, list[str]]:
    """The spec of a checkpoint, where it came from, and the tensors it leaves fixed."""
    ck = load_checkpoint(path)
    s, source = resolve_spec(spec, ck)
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
        s = infer_spec(ck.shapes, order=ck.order)
        info["family"] = s.family
        info["groups"] = len(s.sizes)
    except SpecError:
        info["family"] = None
    return info


def _sub(progress: Progress | None, desc: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(desc, done, total)
