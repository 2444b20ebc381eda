"""The command stories, each one screen: load -> spec -> (data) -> match -> permute -> merge ->
evaluate -> write. The command line and the Python API both call these."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from rebasin.checkpoint import Checkpoint, load_checkpoint
from rebasin.checkpoint.guard import checkpoint_output, file_output, guard_outputs, plot_output
from rebasin.commands.inputs import check_device, check_pair, check_weights
from rebasin.commands.writing import output_metadata, sub_progress, write_checkpoint
from rebasin.core.errors import ConfigError, SpecError
from rebasin.evaluate.setup import (
    EvaluatorData,
    check_data_available,
    evaluation_report,
    make_evaluator,
    wants_evaluation,
)
from rebasin.matching.registry import MatchProblem
from rebasin.matching.result import MatchResult, Progress
from rebasin.merge import Distances, LastRead, interpolate
from rebasin.options import Options, parse_size
from rebasin.permutation import permute, random_permutation
from rebasin.report.document import input_info, new_report, spec_info
from rebasin.spec.choose import freeze_groups, resolve_spec, spec_config
from rebasin.spec.core import PermutationSpec
from rebasin.spec.names import infer_spec
from rebasin.verify.plan import NOT_VERIFIED
from rebasin.verify.worker import Check

PathLike = str | os.PathLike[str]


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - t, 4)


def _load_pair(a_path: PathLike, b_path: PathLike) -> tuple[Checkpoint, Checkpoint]:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    check_pair(a, b)
    return a, b


def _spec(opts: Options, a: Checkpoint, *others: Checkpoint) -> tuple[PermutationSpec, str, list[str]]:
    """Resolve the spec for ``a``, freeze groups, and check the weights it touches."""
    data = opts.evaluate.data if opts.evaluate else None
    spec, source = resolve_spec(opts.spec.spec, a, opts.model.model, opts.model.model_args, data)
    spec, frozen = freeze_groups(spec, opts.spec.freeze)
    for ck in (a, *others):
        check_weights(ck, spec)
    return spec, source, frozen


def _align(
    opts: Options, a: Checkpoint, b: Checkpoint, spec: PermutationSpec, ev: Any, progress: Progress | None
) -> MatchResult:
    """Run the configured matcher, with the data side where it needs one."""
    matcher = opts.matcher
    data = EvaluatorData(ev, a, spec, opts.run.seed) if ev is not None and matcher.wants_data() else None
    problem = MatchProblem(a.state, b.state, spec, data, opts.run.seed, opts.run.device)
    return matcher.match(problem, progress)


def _match_report(
    command: str, a: Checkpoint, b: Checkpoint, spec: PermutationSpec, source: str, frozen: list[str], r: Any
) -> dict[str, Any]:
    report = new_report(command)
    report["inputs"] = {"a": input_info(a), "b": input_info(b)}
    report["spec"] = spec_info(spec, source, list(a.state)) | {"frozen": frozen}
    report["method"] = {"name": r.method, "options": r.options}
    report["match"] = r.to_dict()
    return report


def merge_checkpoints(
    a_path: PathLike,
    b_path: PathLike,
    out: PathLike | None = None,
    options: Options | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Align B to A, write ``(1 - alpha) A + alpha pi(B)`` to ``out`` (if given); return the report.
    With evaluation options, also measure the naive and aligned paths and apply the BatchNorm mode
    (reset or REPAIR) to the merged checkpoint."""
    opts = options or Options()
    check_device(opts.run.device)
    out = out if out is not None else opts.output.output
    o = opts.output
    guard_outputs(
        [
            checkpoint_output(out, "-o") if out is not None else None,
            checkpoint_output(o.save_permuted, "--save-permuted") if o.save_permuted else None,
            file_output(o.report, "--report") if o.report else None,
        ],
        [a_path, b_path],
        o.force,
    )
    shard, timings, t0 = parse_size(o.shard_size), dict[str, float](), time.perf_counter()
    with _timed(timings, "load_s"):
        a, b = _load_pair(a_path, b_path)
    with _timed(timings, "spec_s"):
        spec, source, frozen = _spec(opts, a, b)
    check_data_available(opts.matcher, opts, a)
    # the check's worker builds the model and runs B while matching runs
    with Check(opts, a, spec, [(b, "pi(B)", "B")]) as check:
        wanted = wants_evaluation(opts, a)
        ev = make_evaluator(a, opts) if wanted or opts.matcher.needs_data() else None
        result = _align(opts, a, b, spec, ev, progress)
        timings["match_s"] = round(result.seconds, 4)
        check.submit(result.perm)  # checked beside the write: nothing is put in place before it passes
        a_state = LastRead(a.state)  # the write pass reads each tensor of A once for both uses
        distances = Distances(a_state, b.state, spec, result.perm)
        b_aligned = distances.aligned()  # measures both distances as the merge reads it
        report = _match_report("merge", a, b, spec, source, frozen, result)
        report["equivalence"] = NOT_VERIFIED

        def verdict() -> None:
            if "verify_s" not in timings:
                with _timed(timings, "verify_s"):  # the wait for it, beyond the work beside it
                    report["equivalence"] = check.result()
                _note_output_group(report)

        report["distance"] = {}
        common = _provenance(opts, result, source, spec, report)
        if ev is not None and wanted is not None:
            with _timed(timings, "evaluate_s"):
                report["evaluation"] = _curves(ev, a_state, b.state, b_aligned, wanted.alphas, progress)
            common["bn"] = ev.bn
        written: dict[str, list[str]] = {}
        with _timed(timings, "write_s"):
            alpha = opts.merge.alpha
            if out is not None:
                fixed_bn = wanted is not None and ev is not None and ev.bn != "none"
                merged = (
                    ev.merged_state(a_state, b_aligned, alpha)  # type: ignore[union-attr]
                    if fixed_bn
                    else interpolate(a_state, b_aligned, alpha)
                )
                meta = output_metadata(a.metadata, command="merge", alpha=alpha, **common)
                written["merged"] = [
                    str(f)
                    for f in write_checkpoint(
                        merged, out, meta, a, shard, sub_progress(progress, "writing"), verdict
                    )
                ]
            if o.save_permuted is not None:
                meta = output_metadata(b.metadata, command="align", **common)
                written["permuted"] = [
                    str(f) for f in write_checkpoint(b_aligned, o.save_permuted, meta, b, shard, gate=verdict)
                ]
        verdict()
    with _timed(timings, "distance_s"):  # what the write did not already read
        report["distance"] = distances.result()
    timings["total_s"] = round(time.perf_counter() - t0, 4)
    report["output"] = {"alpha": opts.merge.alpha, "files": written}
    report["timings"] = timings
    _write_report(report, o.report)
    return report


def _write_report(report: dict[str, Any], path: PathLike | None) -> None:
    """Write the JSON report (when asked), listing itself among the outputs."""
    if path is None:
        return
    from rebasin.report.document import write_report

    files = report.setdefault("output", {}).setdefault("files", {})
    if isinstance(files, list):
        files.append(str(path))
    else:
        files["report"] = [str(path)]
    write_report(report, path)


def _note_output_group(report: dict[str, Any]) -> None:
    g = report["equivalence"].get("output_group")
    if g:
        report.setdefault("notes", []).append(
            f"the model's output axis follows group '{g}': the aligned model answers in A's coordinates"
        )


def _provenance(
    opts: Options, result: MatchResult, source: str, spec: PermutationSpec, report: dict[str, Any]
) -> dict[str, Any]:
    return {
        "method": result.method,
        "seed": opts.run.seed,
        "spec": source,
        "spec_digest": spec.digest(),
        "input_a.sha256": report["inputs"]["a"]["sha256"],
        "input_b.sha256": report["inputs"]["b"]["sha256"],
    }


def _curves(
    ev: Any,
    a: Any,
    b: Any,
    b_aligned: Any | None,
    alphas: int,
    progress: Progress | None,
    ray: str | None = None,
) -> dict[str, Any]:
    """Naive and (when ``b_aligned`` is given) aligned curves, as the report's evaluation section;
    with ``ray``, the alpha points run as Ray tasks."""
    from rebasin.evaluate.paths import alpha_grid

    pool = None
    if ray is not None:
        from rebasin.commands.cluster import RayMap, connect

        pool = RayMap(connect(ray))
    grid = alpha_grid(alphas)
    curves = {"naive": ev.curve(a, b, grid, progress, "naive", pool)}
    if b_aligned is not None:
        curves["aligned"] = ev.curve(a, b_aligned, grid, progress, "aligned", pool)
    return evaluation_report(ev, curves)


def barrier_checkpoints(
    a_path: PathLike, b_path: PathLike, options: Options | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Loss/accuracy along the naive path and (unless ``options.align`` is off) the aligned path."""
    opts = options or Options()
    check_device(opts.run.device)
    if opts.run.ray is not None:  # before any work: a missing package or cluster is one line
        from rebasin.commands.cluster import connect

        connect(opts.run.ray)
    o = opts.output
    plot = plot_output(o.plot) if o.plot else None
    guard_outputs([plot, file_output(o.report, "--report") if o.report else None], [a_path, b_path], o.force)
    t0 = time.perf_counter()
    a, b = _load_pair(a_path, b_path)
    ev = make_evaluator(a, opts)
    b_aligned = None
    if opts.align:
        spec, source, frozen = _spec(opts, a, b)
        # the check's worker builds the model and runs B while matching runs
        with Check(opts, a, spec, [(b, "pi(B)", "B")]) as check:
            result = _align(opts, a, b, spec, ev, progress)
            report = _match_report("barrier", a, b, spec, source, frozen, result)
            b_aligned = permute(b.state, spec, result.perm)
            report["equivalence"] = check(result.perm)
        _note_output_group(report)
    else:
        check_weights(a)
        check_weights(b)
        report = new_report("barrier")
        report["inputs"] = {"a": input_info(a), "b": input_info(b)}
        report["method"] = {"name": "none"}
    alphas = (opts.evaluate.alphas if opts.evaluate else None) or 25
    report["evaluation"] = _curves(ev, a.state, b.state, b_aligned, alphas, progress, opts.run.ray)
    report["timings"] = {"total_s": round(time.perf_counter() - t0, 4)}
    if plot is not None:
        from rebasin.report.plot import plot_curves

        files = plot_curves(report["evaluation"], plot.path)
        report.setdefault("output", {}).setdefault("files", {})["plot"] = [str(f) for f in files]
    _write_report(report, o.report)
    return report


def permute_checkpoint(
    path: PathLike, out: PathLike | None = None, options: Options | None = None
) -> dict[str, Any]:
    """Write a random function-preserving permutation of a checkpoint; return the report."""
    opts = options or Options()
    out = out if out is not None else opts.output.output
    if out is None:
        raise ConfigError("permute needs an output path (-o)")
    guard_outputs([checkpoint_output(out, "-o")], [path], opts.output.force)
    ck = load_checkpoint(path)
    s, source, frozen = _spec(opts, ck)
    perm = random_permutation(s, opts.run.seed)
    with Check(opts, ck, s, [(ck, "the permuted model", "the original")]) as check:
        equivalence = check(perm)
        kept = equivalence.get("output_group")
        if kept:  # the model's output axis: moving it would change what the model returns
            perm[kept] = torch.arange(len(perm[kept]))
            frozen = [*frozen, kept]
            equivalence = check(perm)
    meta = output_metadata(
        ck.metadata, command="permute", seed=opts.run.seed, spec=source, spec_digest=s.digest()
    )
    files = write_checkpoint(permute(ck.state, s, perm), out, meta, ck, parse_size(opts.output.shard_size))
    report = new_report("permute")
    report["inputs"] = {"a": input_info(ck)}
    report["spec"] = spec_info(s, source, list(ck.state)) | {"frozen": frozen}
    report["seed"] = opts.run.seed
    report["equivalence"] = equivalence
    if kept:
        report["notes"] = [f"kept group '{kept}' fixed: it is the model's output axis"]
    report["moved_fraction"] = {g: float((p != torch.arange(len(p))).float().mean()) for g, p in perm.items()}
    report["output"] = {"files": [str(f) for f in files]}
    return report


def merge_many_checkpoints(
    paths: Sequence[PathLike],
    out: PathLike | None = None,
    options: Options | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Align N checkpoints to a common reference (MergeMany) and write the mean of the aligned models."""
    from rebasin.matching.mergemany import MergeMany
    from rebasin.merge import average

    opts = options or Options()
    check_device(opts.run.device)
    out = out if out is not None else opts.output.output
    if len(paths) < 2:
        raise ConfigError("merge-many needs at least two checkpoints")
    if out is None:
        raise ConfigError("merge-many needs an output path (-o)")
    o = opts.output
    report_out = file_output(o.report, "--report") if o.report else None
    guard_outputs([checkpoint_output(out, "-o"), report_out], paths, o.force)
    cks = [load_checkpoint(p) for p in paths]
    for ck in cks[1:]:
        check_pair(cks[0], ck)
    s, source, frozen = _spec(opts, *cks)
    solver = MergeMany(max_rounds=opts.merge.max_rounds, seed=opts.run.seed, device=opts.run.device)
    targets = [(c, f"model {i + 1} aligned", f"model {i + 1}") for i, c in enumerate(cks)]
    with Check(opts, cks[0], s, targets) as check:  # the model is built while matching runs
        result = solver.match([c.state for c in cks], s, progress)
        for i, p in enumerate(result.perms):
            check.submit(p, i)  # checked beside the write: nothing is put in place before they pass

        def verdicts() -> list[dict[str, Any]]:  # answers are kept: asking again costs nothing
            return [check.result(i) for i in range(len(cks))]

        aligned = [permute(c.state, s, p) for c, p in zip(cks, result.perms, strict=True)]
        meta = output_metadata(
            cks[0].metadata,
            command="merge-many",
            method="merge-many",
            seed=opts.run.seed,
            spec=source,
            spec_digest=s.digest(),
            models=len(cks),
        )
        shard = parse_size(opts.output.shard_size)
        files = write_checkpoint(average(aligned), out, meta, cks[0], shard, gate=verdicts)
        checks = verdicts()
    report = new_report("merge-many")
    report["inputs"] = [input_info(c) for c in cks]
    report["spec"] = spec_info(s, source, list(cks[0].state)) | {"frozen": frozen}
    report["merge_many"] = result.to_dict()
    report["equivalence"] = (
        checks[0]
        if checks[0]["ok"] is None
        else {
            "ok": all(c["ok"] for c in checks),
            "max_abs_diff": max(c["max_abs_diff"] for c in checks),
            "relative": max(c["relative"] for c in checks),
            "probe": checks[0]["probe"],
            "output_group": next((c["output_group"] for c in checks if c["output_group"]), None),
        }
    )
    report["output"] = {"files": [str(f) for f in files]}
    _write_report(report, o.report)
    return report


def describe_spec(path: PathLike, options: Options | None = None) -> tuple[PermutationSpec, str, list[str]]:
    """The spec of a checkpoint, where it came from, and the tensors it leaves fixed."""
    opts = options or Options()
    ck = load_checkpoint(path)
    s, source = resolve_spec(opts.spec.spec, ck, opts.model.model, opts.model.model_args)
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


__all__ = [
    "barrier_checkpoints",
    "describe_spec",
    "inspect_checkpoint",
    "merge_checkpoints",
    "merge_many_checkpoints",
    "permute_checkpoint",
]
