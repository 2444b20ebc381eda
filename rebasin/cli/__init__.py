"""The ``rebasin`` command line: parse options, call the library, render. Nothing else lives here.

stdout carries data (``--json``); stderr carries tables, progress, warnings and errors.
Exit codes: 0 success, 1 a gate failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from rebasin.cli.failures import OneLineErrors, handled, on_sigterm
from rebasin.cli.params import choice, with_options
from rebasin.matching.registry import DEFAULT_METHOD, list_matchers

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
        from rebasin._version import __version__

        print(f"rebasin {__version__} (distribution: basinmerge)")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Merge neural networks modulo permutation symmetry."""
    from rebasin._memory import return_freed_tensors

    return_freed_tensors()  # streamed runs: memory follows the tensors alive, not glibc's heap


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout, nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No tables or progress on stderr.")]
MaxBarrierOpt = Annotated[
    float | None,
    typer.Option("--max-barrier", help="Gate for items that set none: exit 1 above this barrier."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
AlphasOpt = Annotated[int, typer.Option("--alphas", help="Points on the interpolation grid.")]


METHOD = typer.Option("--method", help="How to find the permutation (see docs/algorithms.md).")
BARRIER_METHOD = typer.Option(
    "--method", help="Alignment of the aligned path; none draws the naive path only."
)
MethodName: Any = choice(list_matchers())
BarrierMethodName: Any = choice([*list_matchers(), "none"])


def _gate(value: float | None, limit: float | None, quiet: bool) -> None:
    from rebasin.commands import gate

    reason = gate(value, limit)
    if reason is not None:
        if not quiet:
            from rebasin.report.render import err

            err.print(f"gate failed: {reason}", soft_wrap=True)
        raise typer.Exit(1)


def _emit_json(report: Any) -> None:
    from rebasin.report.document import to_json

    sys.stdout.write(to_json(report))


def _options(command: str, values: dict[str, Any], evaluate: str = "auto") -> Any:
    from rebasin.options import build_options

    return build_options(values, command, evaluate=evaluate)


@app.command()
@handled
@with_options("merge", required=("output",))
def merge(
    a: Annotated[Path, typer.Argument(help="Reference checkpoint A.")],
    b: Annotated[Path, typer.Argument(help="Checkpoint B, aligned to A before merging.")],
    method: Annotated[MethodName, METHOD] = DEFAULT_METHOD,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    values: dict[str, Any] | None = None,
) -> None:
    """Align B to A and write (1 - alpha) A + alpha pi(B); with --data, also measure the barrier."""
    from rebasin.commands import gate_value, merge_checkpoints
    from rebasin.report import render

    opts = _options("merge", {**(values or {}), "method": method})
    with render.progress_bar(not (as_json or quiet) and render.interactive()) as progress:
        rep = merge_checkpoints(a, b, None, opts, progress)
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.merge_summary(rep)
        if "evaluation" in rep:
            render.evaluation_summary(rep)
    _gate(gate_value(rep), opts.evaluate.max_barrier if opts.evaluate else None, quiet or as_json)


@app.command()
@handled
@with_options("permute", required=("output",))
def permute(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to permute.")],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    values: dict[str, Any] | None = None,
) -> None:
    """Write a random, function-preserving permutation of a checkpoint."""
    from rebasin.commands import permute_checkpoint
    from rebasin.report import render

    rep = permute_checkpoint(checkpoint, None, _options("permute", values or {}, "never"))
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.permute_summary(rep)


@app.command("merge-many")
@handled
@with_options("merge-many", required=("output",))
def merge_many(
    checkpoints: Annotated[list[Path], typer.Argument(help="Two or more checkpoints of one architecture.")],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    values: dict[str, Any] | None = None,
) -> None:
    """MergeMany: align every model to the mean of the others, repeat, write the mean."""
    from rebasin.commands import merge_many_checkpoints
    from rebasin.report import render

    opts = _options("merge-many", values or {}, "never")
    with render.progress_bar(not (as_json or quiet) and render.interactive()) as progress:
        rep = merge_many_checkpoints(checkpoints, None, opts, progress)
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.many_summary(rep)


@app.command("spec")
@handled
@with_options("spec")
def spec_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint whose spec to show.")],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    values: dict[str, Any] | None = None,
) -> None:
    """Show the permutation groups (and the tensors left fixed); export them with -o (.yaml or .json)."""
    from rebasin.checkpoint.atomic import write_bytes
    from rebasin.checkpoint.guard import file_output, guard_outputs
    from rebasin.commands import describe_spec
    from rebasin.report import render
    from rebasin.report.document import spec_info
    from rebasin.spec.core import dump_spec

    opts = _options("spec", values or {}, "never")
    output = Path(opts.output.output) if opts.output.output else None
    if output is not None:
        guard_outputs([file_output(output, "-o")], [checkpoint], opts.output.force)
    s, source, fixed = describe_spec(checkpoint, opts)
    if output is not None:
        write_bytes(output, dump_spec(s, fixed, as_json=output.suffix == ".json").encode())
    info = spec_info(s, source, [*s.params, *fixed])
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    elif not quiet:
        render.spec_summary(info, fixed)
        if output is not None:
            render.err.print(f"wrote {output}")


@app.command()
@handled
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or directory.")],
    as_json: JsonOpt = False,
) -> None:
    """List tensors, shapes, dtypes, parameter count and metadata."""
    from rebasin.commands import inspect_checkpoint
    from rebasin.report import render

    info = inspect_checkpoint(checkpoint)
    if as_json:
        _emit_json(info)
    else:
        render.inspect_summary(info)


@app.command()
@handled
@with_options("barrier")
def barrier(
    a: Annotated[Path, typer.Argument(help="Checkpoint A (alpha = 0).")],
    b: Annotated[Path, typer.Argument(help="Checkpoint B (alpha = 1).")],
    method: Annotated[BarrierMethodName, BARRIER_METHOD] = DEFAULT_METHOD,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    values: dict[str, Any] | None = None,
) -> None:
    """Loss and accuracy along the naive and the aligned interpolation path; both barriers."""
    from rebasin.commands import barrier_checkpoints, gate_value
    from rebasin.report import render

    align = method != "none"
    opts = _options(
        "barrier", {**(values or {}), "method": method if align else DEFAULT_METHOD, "align": align}, "always"
    )
    with render.progress_bar(not (as_json or quiet) and render.interactive()) as progress:
        rep = barrier_checkpoints(a, b, opts, progress)
    written = [f for fs in rep.get("output", {}).get("files", {}).values() for f in fs]
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.evaluation_summary(rep)
        if "match" in rep:
            render.auto_choice(rep["match"])
        render.checked(rep)
        if written:
            render.wrote(written)
    _gate(gate_value(rep), opts.evaluate.max_barrier if opts.evaluate else None, quiet or as_json)


@app.command("train")
@handled
def train_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")],
    arch: Annotated[
        str,
        typer.Option(
            "--arch", help="Built-in model (mlp, vgg, resnet20, resnet, transformer) or MODULE:FACTORY."
        ),
    ] = "mlp",
    arch_args: Annotated[
        str | None, typer.Option("--arch-args", help="JSON object of model arguments.")
    ] = None,
    data: Annotated[str, typer.Option("--data", help="Data to train on.")] = "mnist1d",
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialization and data order.")] = 0,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 20,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 128,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model on built-in or user data (seeded); the checkpoint records how to rebuild it."""
    from rebasin.commands.demo import train_checkpoint
    from rebasin.models.resolve import parse_model_args
    from rebasin.report import render

    args = parse_model_args(arch_args)
    if arch == "mlp" and "in_features" not in args:
        from rebasin.data import load_data

        d = load_data(data, seed)
        args = {"in_features": int(d.x_train[0].numel()), "num_classes": d.num_classes, **args}
    with render.progress_bar(not (as_json or quiet) and render.interactive()) as progress:
        rep = train_checkpoint(
            arch,
            args,
            data,
            output,
            seed=seed,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            weight_decay=weight_decay,
            force=force,
            progress=progress,
        )
    if as_json:
        _emit_json(rep)
    elif not quiet:
        m = rep["metrics"]
        render.err.print(
            f"trained {arch} on {data} (seed {seed}, {epochs} epochs): "
            f"train acc {100 * m['train']['acc']:.1f}%, "
            f"test acc {100 * m['test']['acc']:.1f}%; wrote {output}",
            soft_wrap=True,
        )


@app.command()
@handled
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoints, report and plot.")] = Path(
        "rebasin-demo"
    ),
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 20,
    alphas: AlphasOpt = 25,
    budget: Annotated[
        float,
        typer.Option("--budget", min=0.0, help="Seconds method auto may spend on its costlier candidates."),
    ] = 60.0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train two MLPs on MNIST-1D, merge them, and show the barrier before and after alignment."""
    from rebasin.commands.demo import check_demo_folder, run_demo
    from rebasin.report import render

    check_demo_folder(out, force)
    if not (as_json or quiet):
        render.err.print(
            f"rebasin demo: training two MLPs (2 x 512 hidden units) on MNIST-1D with seeds 0 and 1, "
            f"aligning B to A (method auto: the best of several methods on training data), and "
            f"measuring loss along both paths. Output: {out}/",
            soft_wrap=True,
        )
    with render.progress_bar(not (as_json or quiet) and render.interactive()) as progress:
        rep = run_demo(out, epochs=epochs, alphas=alphas, budget=budget, force=force, progress=progress)
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.merge_summary(rep)
        render.evaluation_summary(rep)


@app.command()
@handled
def batch(
    plan: Annotated[Path, typer.Argument(help="YAML plan of merges and barriers.")],
    max_barrier: MaxBarrierOpt = None,
    allow_code: Annotated[
        bool,
        typer.Option(
            "--allow-code",
            help="Let plan keys model/data import and run the code they name (MODULE:NAME, file.py:NAME).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help="Print one JSON line per item as it finishes.")
    ] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="local|auto|ADDRESS",
            help="Run the items as Ray tasks: local (a private instance on this machine), auto (the "
            "cluster this machine belongs to) or a cluster ADDRESS. Needs the [ray] extra.",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run many merges/barriers from a plan; exit 1 if any item failed or any gate failed."""
    import json as _json

    from rebasin.commands.batch import load_plan, plan_items, run_plan, summarize
    from rebasin.report import render
    from rebasin.report.document import jsonable

    if max_barrier is not None:
        from rebasin.options import EvalOptions

        EvalOptions(max_barrier=max_barrier)  # checked like every option: finite
    p = load_plan(plan, allow_code)
    rows = []
    if ray is not None:
        from rebasin.commands.cluster import connect, run_items

        results = run_items(connect(ray), plan_items(p, max_barrier))
    else:
        results = run_plan(p, max_barrier)
    for row in results:
        rows.append(row)
        if jsonl:
            sys.stdout.write(_json.dumps(jsonable(row)) + "\n")
            sys.stdout.flush()
    summary = summarize(p, rows)
    if as_json:
        _emit_json(summary)
    elif not (quiet or jsonl):
        render.batch_summary(summary)
    if summary["failed"]:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point: SIGTERM, like Ctrl-C, removes temporary files on the way out."""
    import signal

    signal.signal(signal.SIGTERM, on_sigterm)
    app()


if __name__ == "__main__":
    main()
