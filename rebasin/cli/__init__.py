"""The ``rebasin`` command line: parse options, call the library, render. Nothing else lives here.

Every option comes from the options model (``rebasin.options``): its flag, help, bounds and
choices. stdout carries data (``--json``); stderr carries tables, progress, warnings and errors.
Exit codes: 0 success, 1 a gate failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from rebasin._memory import return_freed_tensors
from rebasin._version import __version__
from rebasin.cli.failures import OneLineErrors, handled, on_sigterm
from rebasin.cli.params import with_options
from rebasin.core.errors import ConfigError
from rebasin.options import build_options
from rebasin.report import render

app = typer.Typer(
    cls=OneLineErrors,
    name="rebasin",
    help="Merge neural networks modulo permutation symmetry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"rebasin {__version__} (distribution: basinmerge)")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Merge neural networks modulo permutation symmetry."""

    return_freed_tensors()  # streamed runs: memory follows the tensors alive, not glibc's heap


def _options(command: str, values: dict[str, Any] | None) -> Any:

    return build_options(values or {}, command)


def _talks(opts: Any) -> bool:
    """Whether people get tables and messages on stderr."""
    return not (opts.console.json or opts.console.quiet)


@contextmanager
def _progress(opts: Any) -> Iterator[Callable[[str, float, float], None] | None]:

    with render.progress_bar(_talks(opts) and render.interactive()) as progress:
        yield progress


def _emit(opts: Any, report: Any, *show: Callable[[Any], None]) -> None:
    """The report as JSON on stdout, or its rendering on stderr."""
    if opts.console.json:
        from rebasin.report.document import to_json

        sys.stdout.write(to_json(report))
    elif not opts.console.quiet:
        for fn in show:
            fn(report)


def _gate(opts: Any, report: Any) -> None:
    from rebasin.report.document import gate, gate_value

    reason = gate(gate_value(report), opts.evaluate.max_barrier)
    if reason is not None:
        if _talks(opts):
            render.err.print(f"gate failed: {reason}", soft_wrap=True, markup=False)
        raise typer.Exit(1)


def _dry_run(command: str, opts: Any, paths: list[Path]) -> bool:
    """With ``--dry-run``: resolve and print the run, write nothing (True: done)."""
    if not opts.output.dry_run:
        return False
    from rebasin.commands.dry_run import dry_run

    _emit(opts, dry_run(command, opts, paths), render.dry_run_summary)
    return True


@app.command()
@handled
@with_options("merge", required=("output",))
def merge(
    a: Annotated[Path, typer.Argument(help="Reference checkpoint A.")],
    b: Annotated[Path, typer.Argument(help="Checkpoint B, aligned to A before merging.")],
    values: dict[str, Any] | None = None,
) -> None:
    """Align B to A and write (1 - alpha) A + alpha pi(B); with --data, also measure the barrier."""
    from rebasin.commands.pair import merge_checkpoints

    opts = _options("merge", values)
    if _dry_run("merge", opts, [a, b]):
        return
    with _progress(opts) as progress:
        rep = merge_checkpoints(a, b, None, opts, progress)
    _emit(opts, rep, render.merge_summary, render.evaluation_summary)
    _gate(opts, rep)


@app.command()
@handled
@with_options("barrier")
def barrier(
    models: Annotated[
        list[Path],
        typer.Argument(help="Checkpoints A (alpha = 0) and B (alpha = 1); three or more: the pairwise map."),
    ],
    values: dict[str, Any] | None = None,
) -> None:
    """Loss and accuracy along the naive and the aligned interpolation path; both barriers. With
    more than two models, the map of every pair's barriers, grouped into basins."""
    opts = _options("barrier", values)
    if len(models) < 2:
        raise ConfigError("barrier takes two checkpoints, or more for the pairwise map")
    if len(models) == 2:
        if opts.evaluate.reference is not None:
            raise ConfigError("--reference applies to three or more models", "drop it, or add models")
        from rebasin.commands.pair import barrier_checkpoints

        if _dry_run("barrier", opts, models):
            return
        with _progress(opts) as progress:
            rep = barrier_checkpoints(models[0], models[1], opts, progress)
        _emit(opts, rep, render.barrier_summary)
    else:
        from rebasin.commands.barrier_map import barrier_map

        if opts.output.dry_run:
            raise ConfigError("--dry-run plans one pair", "run it on two of the models")
        with _progress(opts) as progress:
            rep = barrier_map(models, opts, progress)
        _emit(opts, rep, render.map_summary)
    _gate(opts, rep)


@app.command()
@handled
@with_options("diagnose")
def diagnose(
    a: Annotated[Path, typer.Argument(help="Reference checkpoint A.")],
    b: Annotated[Path, typer.Argument(help="Checkpoint B, aligned to A.")],
    values: dict[str, Any] | None = None,
) -> None:
    """Where the alignment holds: each weight tensor's top singular directions in A and pi(B),
    before and after alignment, and (with data) the barrier each layer holds alone."""
    from rebasin.commands.diagnose import diagnose_checkpoints

    opts = _options("diagnose", values)
    with _progress(opts) as progress:
        rep = diagnose_checkpoints(a, b, opts, progress)
    _emit(opts, rep, render.diagnosis_summary)


@app.command()
@handled
@with_options("star", required=("output",))
def star(
    sources: Annotated[list[Path], typer.Argument(help="The source models the star model connects to.")],
    values: dict[str, Any] | None = None,
) -> None:
    """Train a star model linearly connected, modulo permutations, to every source (Starlight),
    and report its barriers to them and to held-out models."""
    from rebasin.commands.star import star_checkpoints

    opts = _options("star", values)
    with _progress(opts) as progress:
        rep = star_checkpoints(list(sources), opts.output.output, opts, progress)
    _emit(opts, rep, render.star_summary)


@app.command()
@handled
@with_options("permute", required=("output",))
def permute(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to permute.")],
    values: dict[str, Any] | None = None,
) -> None:
    """Write a random, function-preserving permutation of a checkpoint."""
    from rebasin.commands.single import permute_checkpoint

    opts = _options("permute", values)
    if _dry_run("permute", opts, [checkpoint]):
        return
    _emit(opts, permute_checkpoint(checkpoint, None, opts), render.permute_summary)


@app.command("merge-many")
@handled
@with_options("merge-many", required=("output",))
def merge_many(
    checkpoints: Annotated[list[Path], typer.Argument(help="Two or more checkpoints of one architecture.")],
    values: dict[str, Any] | None = None,
) -> None:
    """MergeMany: align every model to the mean of the others, repeat, write the mean."""
    from rebasin.commands.many import merge_many_checkpoints

    opts = _options("merge-many", values)
    if _dry_run("merge-many", opts, checkpoints):
        return
    with _progress(opts) as progress:
        rep = merge_many_checkpoints(checkpoints, None, opts, progress)
    _emit(opts, rep, render.many_summary)


@app.command("spec")
@handled
@with_options("spec")
def spec_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint whose spec to show.")],
    values: dict[str, Any] | None = None,
) -> None:
    """Show the permutation groups (and the tensors left fixed); export them with -o (.yaml or .json)."""
    from rebasin.checkpoint.atomic import write_bytes
    from rebasin.commands.single import describe_spec
    from rebasin.report.document import spec_info
    from rebasin.spec.core import dump_spec

    opts = _options("spec", values)
    s, source, fixed = describe_spec(checkpoint, opts)
    output = Path(opts.output.output) if opts.output.output else None
    if output is not None:
        write_bytes(output, dump_spec(s, fixed, as_json=output.suffix == ".json").encode())
    info = spec_info(s, source, [*s.params, *fixed])
    _emit(opts, info, lambda i: render.spec_summary(i, fixed))
    if output is not None and _talks(opts):
        render.wrote([output])


@app.command()
@handled
@with_options("inspect")
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or directory.")],
    values: dict[str, Any] | None = None,
) -> None:
    """List tensors, shapes, dtypes, parameter count and metadata."""
    from rebasin.commands.single import inspect_checkpoint

    opts = _options("inspect", values)
    _emit(opts, inspect_checkpoint(checkpoint), render.inspect_summary)


@app.command("train")
@handled
@with_options("train", required=("output",))
def train_cmd(values: dict[str, Any] | None = None) -> None:
    """Train a model on built-in or user data (seeded); the checkpoint records how to rebuild it."""
    from rebasin.commands.train import train_from_options

    opts = _options("train", values)
    with _progress(opts) as progress:
        rep = train_from_options(opts, progress)
    _emit(opts, rep, render.train_summary)


@app.command()
@handled
@with_options("demo")
def demo(values: dict[str, Any] | None = None) -> None:
    """Train two MLPs on MNIST-1D, merge them, and show the barrier before and after alignment."""
    from rebasin.commands.demo import check_demo_folder, run_demo

    opts = _options("demo", values)
    out, force = Path(opts.output.output), opts.output.force
    check_demo_folder(out, force)
    if _talks(opts):
        render.err.print(
            f"rebasin demo: training two MLPs (2 x 512 hidden units) on MNIST-1D with seeds 0 and 1, "
            f"aligning B to A (method auto: the best of several methods on training data), and "
            f"measuring loss along both paths. Output: {out}/",
            soft_wrap=True,
            markup=False,
        )
    budget = opts.matcher.budget
    with _progress(opts) as progress:
        rep = run_demo(
            out,
            epochs=opts.train.epochs,
            alphas=opts.evaluate.alphas,
            budget=budget,
            force=force,
            progress=progress,
        )
    _emit(opts, rep, render.merge_summary, render.evaluation_summary)


@app.command()
@handled
@with_options("batch")
def batch(
    plan: Annotated[Path, typer.Argument(help="YAML plan of merges and barriers.")],
    values: dict[str, Any] | None = None,
) -> None:
    """Run many merges/barriers from a plan; exit 1 if any item failed or any gate failed."""

    from rebasin.commands.batch import load_plan, plan_items, run_items, run_plan, summarize
    from rebasin.report.document import jsonable

    opts = _options("batch", values)
    p = load_plan(plan, opts.run.allow_code)
    if _dry_run("batch", opts, [plan]):
        return
    rows = []
    if opts.run.ray is not None:
        from rebasin.commands.cluster import connect

        results = run_items(connect(opts.run.ray), plan_items(p, opts.evaluate.max_barrier))
    else:
        results = run_plan(p, opts.evaluate.max_barrier)
    for row in results:
        rows.append(row)
        if opts.console.jsonl:
            sys.stdout.write(json.dumps(jsonable(row)) + "\n")
            sys.stdout.flush()
    summary = summarize(p, rows)
    if not opts.console.jsonl:
        _emit(opts, summary, render.batch_summary)
    if summary["failed"]:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point: SIGTERM, like Ctrl-C, removes temporary files on the way out."""

    signal.signal(signal.SIGTERM, on_sigterm)
    app()


if __name__ == "__main__":
    main()
