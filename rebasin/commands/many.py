"""The ``merge-many`` command: align N models to a common reference (MergeMany) and write the
mean of the aligned models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rebasin.commands.resolve import resolve_run
from rebasin.commands.stages import finish, outputs_of, run_spec
from rebasin.commands.writing import output_metadata, write_checkpoint
from rebasin.core.errors import ConfigError
from rebasin.core.sizes import parse_size
from rebasin.core.types import PathLike, Progress
from rebasin.matching.mergemany import NAME, MergeMany
from rebasin.merge import average
from rebasin.options import Options
from rebasin.permutation import permute
from rebasin.report.document import input_info, new_report, spec_info
from rebasin.verify.worker import Check


def merge_many_checkpoints(
    paths: Sequence[PathLike],
    out: PathLike | None = None,
    options: Options | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Align N checkpoints to a common reference (MergeMany) and write the mean of the aligned models."""

    opts = options or Options()
    if len(paths) < 2:
        raise ConfigError("merge-many needs at least two checkpoints")
    run = resolve_run("merge-many", opts, paths, out if out is not None else opts.output.output)
    cks = run.checkpoints
    spec, source, frozen, _, _ = run_spec(run)
    solver = MergeMany(max_rounds=opts.merge.max_rounds, seed=run.seed, device=run.device)
    targets = [(c, f"model {i + 1} aligned", f"model {i + 1}") for i, c in enumerate(cks)]
    with outputs_of(run):  # the model and the report as one
        with Check(
            run.verification, run.seed, spec, targets
        ) as check:  # the model is built while matching runs
            result = solver.match([c.state for c in cks], spec, progress)
            for i, p in enumerate(result.perms):
                check.submit(p, i)  # checked beside the write: nothing is put in place before they pass

            def verdicts() -> list[dict[str, Any]]:  # answers are kept: asking again costs nothing
                return [check.result(i) for i in range(len(cks))]

            aligned = [permute(c.state, spec, p) for c, p in zip(cks, result.perms, strict=True)]
            meta = output_metadata(
                cks[0].metadata,
                command=NAME,
                method=NAME,
                seed=run.seed,
                spec=source,
                spec_digest=spec.digest(),
                models=len(cks),
            )
            files = write_checkpoint(
                average(aligned),
                run.outputs[0].path,
                meta,
                cks[0],
                parse_size(opts.output.shard_size),
                gate=verdicts,
            )
            checks = verdicts()
        report = new_report(NAME)
        report["inputs"] = [input_info(c) for c in cks]
        report["spec"] = spec_info(spec, source, list(cks[0].state)) | {"frozen": frozen}
        report["merge_many"] = result.to_dict()
        report["equivalence"] = _together(checks)
        report["output"] = {"files": [str(f) for f in files]}
        return finish(report, run)


def _together(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """One equivalence section for every model's check."""
    if checks[0]["ok"] is None:
        return checks[0]
    return {
        "ok": all(c["ok"] for c in checks),
        "max_abs_diff": max(c["max_abs_diff"] for c in checks),
        "relative": max(c["relative"] for c in checks),
        "probe": checks[0]["probe"],
        "output_group": next((c["output_group"] for c in checks if c["output_group"]), None),
    }
