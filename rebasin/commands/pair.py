"""The commands on a pair of models: ``merge`` and ``barrier``. Each reads as a straight line:
load -> resolve -> spec -> match -> check -> (evaluate) -> write."""

from __future__ import annotations

from typing import Any

from rebasin._memory import reusing_freed_memory
from rebasin.commands.diagnose import with_layers
from rebasin.commands.pleas import pleas_checkpoints
from rebasin.commands.resolve import resolve_run
from rebasin.commands.stages import (
    Timings,
    align,
    check_unaligned,
    curves,
    evaluator,
    finish,
    finish_with_plot,
    output_group_note,
    outputs_of,
    pair_report,
    provenance,
    run_spec,
)
from rebasin.commands.writing import output_metadata, sub_progress, write_checkpoint
from rebasin.core.sizes import parse_size
from rebasin.core.types import PathLike, Progress
from rebasin.evaluate.diagnose import Agreements
from rebasin.merge import Distances, LastRead, interpolate
from rebasin.options import Options
from rebasin.options.build import PLEAS
from rebasin.permutation import permute
from rebasin.report.document import input_info, new_report
from rebasin.report.plot import plot_curves
from rebasin.verify.worker import Check


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
    if opts.method == PLEAS:  # a new model of another width, not an alignment
        return pleas_checkpoints(a_path, b_path, out, opts, progress)
    out = out if out is not None else opts.output.output
    timings = Timings()
    with timings("load_s"):
        run = resolve_run("merge", opts, [a_path, b_path], out)
    a, b = run.checkpoints
    with timings("spec_s"):
        spec, source, frozen, dots, first = run_spec(run, first=True)
    with outputs_of(run):  # every output as one: a later failure puts the earlier back
        with Check(run.verification, run.seed, spec, [(b, "pi(B)", "B")]) as check:  # prepared beside
            ev = evaluator(run)
            with timings("match_s"):  # for its reads: the seconds are the matcher's own
                result = align(
                    run, spec, ev, progress, dots, settle_later=True, first=first
                )  # settled by the write pass
            timings["match_s"] = round(result.seconds, 4)
            check.submit(result.perm)  # checked beside the write: nothing is put in place before it passes
            a_state = LastRead(a.state)  # the write pass reads each tensor of A once for both uses
            seen = (
                Agreements(spec, a.shapes, opts.evaluate.top_k, run.seed) if opts.evaluate.diagnose else None
            )
            distances = Distances(
                a_state, b.state, spec, result.perm, seen.add if seen else None, result.unsettled
            )
            b_aligned = distances.aligned()  # measures both distances as the merge reads it
            report = pair_report(run, spec, source, frozen, result)
            if run.evaluation is not None:
                with timings("evaluate_s"):
                    report["evaluation"] = curves(run, ev, a_state, b.state, b_aligned, progress)
            common = provenance(run, spec, source, result.method) | ({"bn": ev.bn} if run.evaluation else {})
            alpha, shard, written = opts.merge.alpha, parse_size(opts.output.shard_size), {}
            with timings("write_s"), reusing_freed_memory():
                if out is not None:
                    fix_bn = run.evaluation is not None and ev.bn != "none"
                    merged = (
                        ev.merged_state(a_state, b_aligned, alpha)
                        if fix_bn
                        else interpolate(a_state, b_aligned, alpha)
                    )
                    meta = output_metadata(a.metadata, command="merge", alpha=alpha, **common)
                    files = write_checkpoint(
                        merged, out, meta, a, shard, sub_progress(progress, "writing"), check.result
                    )
                    written["merged"] = [str(f) for f in files]
                if opts.output.save_permuted is not None:
                    meta = output_metadata(b.metadata, command="align", **common)
                    files = write_checkpoint(
                        b_aligned, opts.output.save_permuted, meta, b, shard, gate=check.result
                    )
                    written["permuted"] = [str(f) for f in files]
            report["equivalence"] = check.result()  # the verdict (already given where a write waited)
            timings["verify_s"] = round(check.waited, 4)
        if notes := output_group_note(report["equivalence"], spec):
            report["notes"] = notes
        with timings("distance_s"):  # what the write did not already read
            report["distance"] = distances.result()
        result = result.settle(distances.dots)  # the exact objective, from the write pass's reads
        report["match"] = result.to_dict()
        if seen is not None:  # the agreements came with the write pass; the layers' paths need data
            with timings("diagnose_s"):
                report["diagnosis"] = with_layers(seen.result(), seen.k, run, ev, b_aligned, progress)
        report["output"] = {"alpha": alpha, "files": written}
        report["timings"] = timings.total()
        report["read_bytes"] = timings.read_bytes
        return finish(report, run)


def barrier_checkpoints(
    a_path: PathLike, b_path: PathLike, options: Options | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Loss/accuracy along the naive path and (unless ``--method none``) the aligned path."""
    opts = options or Options()
    timings = Timings()
    run = resolve_run("barrier", opts, [a_path, b_path])
    a, b = run.checkpoints
    ev = evaluator(run)
    b_aligned = None
    if run.matcher is not None:
        spec, source, frozen, dots, first = run_spec(run, first=True)
        with Check(run.verification, run.seed, spec, [(b, "pi(B)", "B")]) as check:  # prepared beside
            result = align(run, spec, ev, progress, dots, first=first)
            report = pair_report(run, spec, source, frozen, result)
            b_aligned = permute(b.state, spec, result.perm)
            report["equivalence"] = check(result.perm)
        if notes := output_group_note(report["equivalence"], spec):
            report["notes"] = notes
    else:
        check_unaligned(run)
        report = new_report("barrier")
        report["inputs"] = {"a": input_info(a), "b": input_info(b)}
        report["method"] = {"name": "none"}
    report["evaluation"] = curves(run, ev, a.state, b.state, b_aligned, progress)
    report["timings"] = timings.total()
    return finish_with_plot(report, run, lambda path: plot_curves(report["evaluation"], path))
