"""The stages every command story is made of, each taking the resolved :class:`Run`: the spec,
the evaluator, the matching, the curves, the report's shared sections."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from rebasin.checkpoint.atomic import Replaced
from rebasin.checkpoint.reader import bytes_read
from rebasin.commands.cluster import RayMap, connect
from rebasin.commands.inputs import check_all_finite, check_dtypes, scan_multiplies
from rebasin.commands.resolve import Run
from rebasin.core.errors import CheckpointError
from rebasin.core.types import PathLike, Progress
from rebasin.evaluate.paths import alpha_grid
from rebasin.evaluate.setup import EvaluatorData, make_evaluator
from rebasin.matching.costs import GroupProducts
from rebasin.matching.registry import MatchProblem
from rebasin.matching.result import MatchResult
from rebasin.report.document import evaluation_report, input_info, new_report, spec_info, write_report
from rebasin.spec.choose import check_config, choose_spec, freeze_groups
from rebasin.spec.core import PermutationSpec


class Timings(dict[str, float]):
    """Seconds per phase, as the report's ``timings`` section gives them, and the bytes of
    checkpoint files each phase read (``read_bytes``: safetensors files, by this process)."""

    def __init__(self) -> None:
        super().__init__()
        self._t0 = time.perf_counter()
        self.read_bytes: dict[str, int] = {}

    @contextmanager
    def __call__(self, key: str, add: bool = False) -> Iterator[None]:
        """Time the block as ``key`` (``add``: on top of what ``key`` already holds)."""
        t, r = time.perf_counter(), bytes_read()
        try:
            yield
        finally:
            self[key] = round(time.perf_counter() - t + (self.get(key, 0.0) if add else 0.0), 4)
            phase = key.removesuffix("_s")
            if n := bytes_read() - r + (self.read_bytes.get(phase, 0) if add else 0):
                self.read_bytes[phase] = n

    def total(self) -> dict[str, float]:
        return {**self, "total_s": round(time.perf_counter() - self._t0, 4)}


class Scoped(NamedTuple):
    """What :func:`run_spec` settles: the spec, where it came from, the groups held out, and
    what the scan took for the matcher: the identity dots (:attr:`MatchProblem.dots`) and the
    first unit's products (:attr:`MatchProblem.first`)."""

    spec: PermutationSpec
    source: str
    frozen: list[str]
    dots: dict[str, float]
    first: GroupProducts | None = None


def run_spec(run: Run, check_data: bool = True, show: bool = False, first: bool = False) -> Scoped:
    """The run's spec (frozen groups held out), with the weights it touches checked: floating
    point in every checkpoint (from headers) and, unless ``check_data`` is off (a dry run),
    finite (one read of the files, which also gives their SHA-256; for a pair matched on the CPU,
    also ``<A_p, B_p>`` of the weighed parameters, and with ``first``, for a command that
    aligns them next and where the cores allow (:func:`scan_multiplies`), the matcher's first
    products: :meth:`Matcher.first_products`). A spec
    that needs a config the checkpoint lacks is an error, except when it is only shown
    (``show``: ``rebasin spec``)."""
    a = run.checkpoints[0]
    spec, source = choose_spec(run.options.spec.spec, a, run.model, run.known_data)
    patterns = run.options.spec.freeze if show else check_config(spec, a, run.options.spec.freeze)
    spec, frozen = freeze_groups(spec, patterns)
    for ck in run.checkpoints:
        check_dtypes(ck, spec)
    dots: dict[str, float] = {}
    products = None
    if check_data:
        pair = run.matcher is not None and len(run.checkpoints) == 2 and run.device == "cpu"
        if pair and first and run.matcher is not None and scan_multiplies():
            products = run.matcher.first_products(a.state, spec)
        dots = check_all_finite(run.checkpoints, spec.cost_params(()) if pair else (), products)
    return Scoped(spec, source, frozen, dots, products if products is not None and products.covered else None)


def check_unaligned(run: Run, check_data: bool = True) -> None:
    """The checks of the weights when nothing is aligned (no spec): floating point and finite."""
    for ck in run.checkpoints:
        check_dtypes(ck)
    if check_data:
        check_all_finite(run.checkpoints)


def evaluator(run: Run) -> Any:
    """The path evaluator of the run's model on its data (None when nothing runs on data)."""
    if run.data is None:
        return None
    return make_evaluator(run.checkpoints[0], run.model.need(), run.data, run.seed, run.device)


def align(
    run: Run,
    spec: PermutationSpec,
    ev: Any,
    progress: Progress | None,
    dots: dict[str, float] | None = None,
    settle_later: bool = False,
    first: GroupProducts | None = None,
) -> MatchResult:
    """Run the matcher on A and B, with the data side where the run gives it one (``dots`` and
    ``settle_later``: see :class:`MatchProblem`; on the CPU only, where the pass that settles
    sums as matching does)."""
    assert run.matcher is not None
    a, b = run.checkpoints[:2]
    data = EvaluatorData(ev, a, spec, run.seed) if run.matcher_data else None
    problem = MatchProblem(
        a.state,
        b.state,
        spec,
        data,
        run.seed,
        run.device,
        dots=dots,
        first=first,
        settle_later=settle_later and run.device == "cpu",
    )
    return run.matcher.match(problem, progress)


def curves(
    run: Run, ev: Any, a: Any, b: Any, b_aligned: Any | None, progress: Progress | None
) -> dict[str, Any]:
    """The naive and (when ``b_aligned`` is given) aligned curves, as the report's evaluation
    section; with ``--ray``, the alpha points run as Ray tasks."""

    assert run.evaluation is not None
    pool = None
    if run.options.run.ray is not None:
        pool = RayMap(connect(run.options.run.ray))
    grid = alpha_grid(run.evaluation.alphas)
    paths = {"naive": ev.curve(a, b, grid, progress, "naive", pool)}
    if b_aligned is not None:
        paths["aligned"] = ev.curve(a, b_aligned, grid, progress, "aligned", pool)
    return evaluation_report(ev, paths)


def pair_report(
    run: Run, spec: PermutationSpec, source: str, frozen: list[str], r: MatchResult
) -> dict[str, Any]:
    """The report of a command that matched B to A: inputs, spec, method, matching."""
    a, b = run.checkpoints[:2]
    report = new_report(run.command)
    report["inputs"] = {"a": input_info(a), "b": input_info(b)}
    report["spec"] = spec_info(spec, source, list(a.state)) | {"frozen": frozen}
    report["method"] = {"name": r.method, "options": r.options}
    report["match"] = r.to_dict()
    return report


def provenance(run: Run, spec: PermutationSpec, source: str, method: str) -> dict[str, Any]:
    """What an output's metadata records of the run that made it."""
    out: dict[str, Any] = {"method": method, "seed": run.seed, "spec": source, "spec_digest": spec.digest()}
    for key, ck in zip(("input_a", "input_b"), run.checkpoints, strict=False):
        out[f"{key}.sha256"] = ck.sha256()
    return out


def output_group_note(equivalence: dict[str, Any], spec: PermutationSpec) -> list[str]:
    """The report's note when the model's output axis follows a permuted group (found by the
    check, else named by the family)."""
    g = equivalence.get("output_group") or spec.output_group
    if not g:
        return []
    return [f"the model's output axis follows group '{g}': the aligned model answers in A's coordinates"]


def finish(report: dict[str, Any], run: Run) -> dict[str, Any]:
    """The run's notes in the report; write it (when asked), listing itself among the outputs."""
    if run.notes:
        report["notes"] = [*run.notes, *report.get("notes", [])]
    path: PathLike | None = run.options.output.report
    if path is not None:
        files = report.setdefault("output", {}).setdefault("files", {})
        if isinstance(files, list):
            files.append(str(path))
        else:
            files["report"] = [str(path)]
        try:
            write_report(report, path)
        except OSError as e:
            raise CheckpointError(
                f"cannot write the report ({e.strerror or e})",
                "every output of this run was put back as it was",
                source=str(path),
            ) from None
    return report


def finish_with_plot(report: dict[str, Any], run: Run, draw: Callable[[str], list[Path]]) -> dict[str, Any]:
    """The plot (``--plot``: ``draw(path)`` writes it) and the report, as one output."""
    with outputs_of(run):
        if run.options.output.plot:
            files = draw(run.options.output.plot)
            report.setdefault("output", {}).setdefault("files", {})["plot"] = [str(f) for f in files]
        return finish(report, run)


@contextmanager
def outputs_of(run: Run) -> Iterator[None]:
    """Every output of the run as one: if any fails (or anything after the first is written),
    each output gets its old contents back and what the run created is removed."""
    replaced = Replaced([t for o in run.outputs for t in o.targets()])
    try:
        yield
    except BaseException:
        replaced.restore([t for o in run.outputs for t in o.targets()])
        raise
    replaced.drop()
