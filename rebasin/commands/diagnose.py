"""``rebasin diagnose A B``: align B to A, then say where the alignment holds and where the
barrier sits: the singular-direction agreement of every weight tensor before and after alignment
and, with data, the barrier of each layer alone. Reads as a straight line: load -> resolve ->
spec -> match -> check -> diagnose -> (plot) -> report."""

from __future__ import annotations

from typing import Any

from rebasin.commands.resolve import resolve_run
from rebasin.commands.stages import (
    Timings,
    align,
    evaluator,
    finish_with_plot,
    output_group_note,
    pair_report,
    run_spec,
)
from rebasin.core.types import PathLike, Progress
from rebasin.evaluate.diagnose import diagnosis_report, gather, layer_barriers
from rebasin.evaluate.paths import alpha_grid
from rebasin.options import Options
from rebasin.permutation import permute
from rebasin.report.plot import plot_diagnosis
from rebasin.verify.worker import Check


def diagnose_checkpoints(
    a_path: PathLike, b_path: PathLike, options: Options | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """The report of ``rebasin diagnose``: the pair's match and its ``diagnosis``."""
    opts = options or Options()
    timings = Timings()
    run = resolve_run("diagnose", opts, [a_path, b_path])
    b = run.checkpoints[1]
    spec, source, frozen, dots, first = run_spec(run, first=True)
    ev = evaluator(run)
    with Check(run.verification, run.seed, spec, [(b, "pi(B)", "B")]) as check:
        result = align(run, spec, ev, progress, dots, first=first)
        report = pair_report(run, spec, source, frozen, result)
        report["equivalence"] = check(result.perm)
    if notes := output_group_note(report["equivalence"], spec):
        report["notes"] = notes
    with timings("diagnose_s"):
        report["diagnosis"] = diagnose(run, spec, result.perm, ev, progress)
    report["timings"] = timings.total()
    return finish_with_plot(report, run, lambda path: plot_diagnosis(report["diagnosis"], path))


def diagnose(run: Any, spec: Any, perm: Any, ev: Any, progress: Progress | None) -> dict[str, Any]:
    """The ``diagnosis`` of A and pi(B), reading one tensor of each at a time."""
    b = run.checkpoints[1]
    k = run.options.evaluate.top_k
    rows = gather(run.checkpoints[0].state, b.state, spec, perm, k, run.seed, progress)
    return with_layers(rows, k, run, ev, permute(b.state, spec, perm), progress)


def with_layers(
    rows: list[dict[str, Any]], k: int, run: Any, ev: Any, aligned: Any, progress: Progress | None
) -> dict[str, Any]:
    """The ``diagnosis`` section from the tensors' agreements; with data (an evaluator), also the
    barrier of each layer alone."""
    barriers = None
    if ev is not None and run.evaluation is not None:
        grid = alpha_grid(run.evaluation.alphas)
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        barriers = layer_barriers(
            lambda x, y: ev.curve(x, y, grid), run.checkpoints[0].state, aligned, layers, progress
        )
    return diagnosis_report(rows, barriers, k)
