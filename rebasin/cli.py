"""The ``rebasin`` command line: parse options, call the library, render. Nothing else lives here.

stdout carries data (``--json``); stderr carries tables, progress, warnings and errors.
Exit codes: 0 success, 1 a gate failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    name="rebasin",
    help="Merge neural networks modulo permutation symmetry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


class Method(str, Enum):
    weight = "weight"
    activation = "activation"
    ste = "ste"
    sinkhorn = "sinkhorn"


class Cost(str, Enum):
    l2 = "l2"
    mid = "mid"
    rnd = "rnd"


class Estimator(str, Enum):
    st = "st"
    reinmax = "reinmax"


class BarrierMethod(str, Enum):
    weight = "weight"
    activation = "activation"
    ste = "ste"
    sinkhorn = "sinkhorn"
    none = "none"


class BNMode(str, Enum):
    auto = "auto"
    none = "none"
    reset = "reset"
    repair = "repair"


def _handled(fn: F) -> F:
    """Turn library errors into one ``error:`` line (plus ``hint:``) and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rebasin.errors import RebasinError

        try:
            return fn(*args, **kwargs)
        except RebasinError as e:
            from rebasin.render import error

            error(e.line(), e.hint)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        from rebasin._version import __version__

        print(f"rebasin {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Merge neural networks modulo permutation symmetry."""


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout, nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No tables or progress on stderr.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
SpecOpt = Annotated[
    str,
    typer.Option(
        "--spec",
        help="auto (trace --model if given, else infer from names), trace, a family name "
        "(mlp, vgg, resnet, transformer, gpt2, llama, bert, vit) or a spec file.",
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option("--shard-size", help="Split outputs above this size (e.g. 2GB) into shards with an index."),
]


DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="mnist1d, digits, synthetic, a .safetensors/.npz file with x and y, or MODULE:FUNCTION.",
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="Built-in model name or MODULE:FACTORY (default: the architecture recorded in A)."
    ),
]
TraceModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="MODULE:FACTORY or file.py:FACTORY (or a built-in name): trace it for the spec."
    ),
]
ModelArgsOpt = Annotated[str | None, typer.Option("--model-args", help="JSON object of factory arguments.")]
BNOpt = Annotated[
    BNMode,
    typer.Option(
        "--bn", help="BatchNorm handling: auto (reset where the model has BatchNorm), none, reset, repair."
    ),
]
AlphasOpt = Annotated[int, typer.Option("--alphas", min=2, help="Points on the interpolation grid.")]
MaxBarrierOpt = Annotated[
    float | None,
    typer.Option("--max-barrier", help="Exit 1 if the aligned test loss barrier exceeds this."),
]


CostOpt = Annotated[
    Cost,
    typer.Option(
        "--cost", help="Sinkhorn cost: l2 (data-free), mid (midpoint loss), rnd (random-lambda loss)."
    ),
]
StepsOpt = Annotated[
    int | None,
    typer.Option("--steps", min=1, help="Optimizer steps for ste / sinkhorn (defaults 200 / 300)."),
]


EpochsOpt = Annotated[
    int | None,
    typer.Option(
        "--epochs", min=1, help="For ste / sinkhorn with data: passes over the training data (sets --steps)."
    ),
]
FreezeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--freeze",
        metavar="GROUP_PATTERN",
        help="Keep groups matching this glob fixed (repeatable), e.g. residual or 'layers.*.attn.*'.",
    ),
]
EstimatorOpt = Annotated[
    Estimator,
    typer.Option(
        "--estimator", help="ste gradient: st (straight-through on weights) or reinmax (second order)."
    ),
]
LrOpt = Annotated[
    float | None, typer.Option("--lr", help="Adam learning rate for ste / sinkhorn (defaults 1e-3 / 0.1).")
]


def _gate(value: float | None, limit: float | None, quiet: bool) -> None:
    if limit is None or value is None:
        return
    if value > limit:
        if not quiet:
            from rebasin.render import err

            err.print(f"gate failed: test loss barrier {value:.4f} > --max-barrier {limit}", soft_wrap=True)
        raise typer.Exit(1)


def _emit_json(report: Any) -> None:
    from rebasin.report import to_json

    sys.stdout.write(to_json(report))


@app.command()
@_handled
def merge(
    a: Annotated[Path, typer.Argument(help="Reference checkpoint A.")],
    b: Annotated[Path, typer.Argument(help="Checkpoint B, aligned to A before merging.")],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Merged checkpoint (.safetensors, or a directory)."),
    ],
    method: Annotated[Method, typer.Option("--method", help="How to find the permutation.")] = Method.weight,
    cost: CostOpt = Cost.l2,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    estimator: EstimatorOpt = Estimator.st,
    freeze: FreezeOpt = None,
    spec: SpecOpt = "auto",
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of B: (1 - alpha) A + alpha pi(B).")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed for group order and restarts.")] = 0,
    restarts: Annotated[
        int,
        typer.Option("--restarts", min=1, help="Runs of weight matching; the best objective wins."),
    ] = 1,
    max_iter: Annotated[int, typer.Option("--max-iter", min=1, help="Most sweeps per run.")] = 100,
    device: Annotated[str, typer.Option("--device", help="Device for cost matrices (cpu, cuda).")] = "cpu",
    save_permuted: Annotated[
        Path | None, typer.Option("--save-permuted", help="Also write pi(B) alone.")
    ] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    shard_size: ShardOpt = None,
    data: DataOpt = None,
    model: ModelOpt = None,
    model_args: ModelArgsOpt = None,
    bn: BNOpt = BNMode.auto,
    alphas: AlphasOpt = 25,
    max_barrier: MaxBarrierOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Align B to A and write (1 - alpha) A + alpha pi(B); with --data, also measure the barrier."""
    from rebasin import render
    from rebasin.pipeline import EvalOptions, MergeOptions, gate_value, merge_checkpoints
    from rebasin.report import write_report

    if report is not None:
        from rebasin.checkpoint import check_output_path

        check_output_path(report, [a, b], force)
    opts = MergeOptions(
        method=method.value,
        alpha=alpha,
        spec=spec,
        seed=seed,
        restarts=restarts,
        max_iter=max_iter,
        device=device,
        shard_size=shard_size,
        force=force,
        save_permuted=save_permuted,
        cost=cost.value,
        steps=steps,
        epochs=epochs,
        lr=lr,
        estimator=estimator.value,
        freeze=freeze or [],
        model=model,
        model_args=model_args,
    )
    evaluation = None
    if (
        data is not None
        or model is not None
        or bn in (BNMode.reset, BNMode.repair)
        or max_barrier is not None
    ):
        evaluation = EvalOptions(
            data=data,
            model=model,
            model_args=model_args,
            alphas=alphas,
            bn=bn.value,
            device=device,
            optional=data is None and bn not in (BNMode.reset, BNMode.repair) and max_barrier is None,
        )
    with render.progress_bar(not (as_json or quiet) and render.interactive()) as progress:
        rep = merge_checkpoints(a, b, output, opts, progress, evaluation)
    if report is not None:
        write_report(rep, report)
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.merge_summary(rep)
        if "evaluation" in rep:
            render.evaluation_summary(rep)
    _gate(gate_value(rep), max_barrier, quiet or as_json)


@app.command()
@_handled
def permute(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to permute.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the permuted checkpoint.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random permutation.")] = 0,
    spec: SpecOpt = "auto",
    model: TraceModelOpt = None,
    model_args: ModelArgsOpt = None,
    shard_size: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a random, function-preserving permutation of a checkpoint."""
    from rebasin import render
    from rebasin.pipeline import permute_checkpoint

    rep = permute_checkpoint(
        checkpoint, output, seed, spec, force=force, shard_size=shard_size, model=model, model_args=model_args
    )
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.permute_summary(rep)


@app.command("merge-many")
@_handled
def merge_many(
    checkpoints: Annotated[list[Path], typer.Argument(help="Two or more checkpoints of one architecture.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the merged checkpoint.")],
    spec: SpecOpt = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1, help="Most rounds over all models.")] = 20,
    freeze: FreezeOpt = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    shard_size: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """MergeMany: align every model to the mean of the others, repeat, write the mean."""
    from rebasin import render
    from rebasin.pipeline import merge_many_checkpoints
    from rebasin.report import write_report

    if report is not None:
        from rebasin.checkpoint import check_output_path

        check_output_path(report, checkpoints, force)
    with render.progress_bar(not (as_json or quiet) and render.interactive()) as progress:
        rep = merge_many_checkpoints(
            checkpoints,
            output,
            spec=spec,
            seed=seed,
            max_rounds=max_rounds,
            device=device,
            force=force,
            shard_size=shard_size,
            progress=progress,
            freeze=freeze or [],
        )
    if report is not None:
        write_report(rep, report)
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.many_summary(rep)


@app.command("spec")
@_handled
def spec_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint whose spec to show.")],
    spec: SpecOpt = "auto",
    model: TraceModelOpt = None,
    model_args: ModelArgsOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Export the spec (.yaml or .json).")
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show the permutation groups (and the tensors left fixed); export them with -o."""
    from rebasin import render
    from rebasin.checkpoint import check_output_path
    from rebasin.pipeline import describe_spec
    from rebasin.report import spec_info
    from rebasin.spec.core import dump_spec

    if output is not None:
        check_output_path(output, [checkpoint], force)
    s, source, fixed = describe_spec(checkpoint, spec, model, model_args)
    if output is not None:
        text = dump_spec(s, fixed, as_json=output.suffix == ".json")
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text(text)
        tmp.replace(output)
    info = spec_info(s, source, [*s.params, *fixed])
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    elif not quiet:
        render.spec_summary(info, fixed)
        if output is not None:
            render.err.print(f"wrote {output}")


@app.command()
@_handled
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or directory.")],
    as_json: JsonOpt = False,
) -> None:
    """List tensors, shapes, dtypes, parameter count and metadata."""
    from rebasin import render
    from rebasin.pipeline import inspect_checkpoint

    info = inspect_checkpoint(checkpoint)
    if as_json:
        _emit_json(info)
    else:
        render.inspect_summary(info)


@app.command()
@_handled
def barrier(
    a: Annotated[Path, typer.Argument(help="Checkpoint A (alpha = 0).")],
    b: Annotated[Path, typer.Argument(help="Checkpoint B (alpha = 1).")],
    data: DataOpt = None,
    model: ModelOpt = None,
    model_args: ModelArgsOpt = None,
    method: Annotated[
        BarrierMethod,
        typer.Option("--method", help="Alignment for the aligned path; none draws the naive path only."),
    ] = BarrierMethod.weight,
    cost: CostOpt = Cost.l2,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    estimator: EstimatorOpt = Estimator.st,
    freeze: FreezeOpt = None,
    spec: SpecOpt = "auto",
    alphas: AlphasOpt = 25,
    bn: BNOpt = BNMode.auto,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    restarts: Annotated[int, typer.Option("--restarts", min=1)] = 1,
    max_train: Annotated[
        int | None, typer.Option("--max-train", help="Use at most N training examples.")
    ] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write the curves as PNG (and SVG beside it).")
    ] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    max_barrier: MaxBarrierOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Loss and accuracy along the naive and the aligned interpolation path; both barriers."""
    from rebasin import render
    from rebasin.checkpoint import check_output_path
    from rebasin.pipeline import EvalOptions, MergeOptions, barrier_checkpoints, gate_value
    from rebasin.report import write_report

    for out in (plot, report):
        if out is not None:
            check_output_path(out, [a, b], force)
    opts = MergeOptions(
        method=method.value if method != BarrierMethod.none else "weight",
        spec=spec,
        seed=seed,
        restarts=restarts,
        device=device,
        cost=cost.value,
        steps=steps,
        epochs=epochs,
        lr=lr,
        estimator=estimator.value,
        freeze=freeze or [],
        model=model,
        model_args=model_args,
    )
    ev = EvalOptions(
        data=data,
        model=model,
        model_args=model_args,
        alphas=alphas,
        bn=bn.value,
        max_train=max_train,
        device=device,
    )
    with render.progress_bar(not (as_json or quiet) and render.interactive()) as progress:
        rep = barrier_checkpoints(a, b, opts, ev, align=method != BarrierMethod.none, progress=progress)
    written = []
    if plot is not None:
        from rebasin.plot import plot_curves

        written += plot_curves(rep["evaluation"], plot)
    if report is not None:
        write_report(rep, report)
        written.append(report)
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.evaluation_summary(rep)
        if written:
            render.wrote(written)
    _gate(gate_value(rep), max_barrier, quiet or as_json)


@app.command("train")
@_handled
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
    from rebasin import render
    from rebasin.demo import train_checkpoint
    from rebasin.models.resolve import parse_model_args

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
@_handled
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoints, report and plot.")] = Path(
        "rebasin-demo"
    ),
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 20,
    alphas: AlphasOpt = 25,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train two MLPs on MNIST-1D, merge them, and show the barrier before and after alignment."""
    from rebasin import render
    from rebasin.demo import check_demo_folder, run_demo

    check_demo_folder(out, force)
    if not (as_json or quiet):
        render.err.print(
            f"rebasin demo: training two MLPs (2 x 512 hidden units) on MNIST-1D with seeds 0 and 1, "
            f"aligning B to A by weight matching, and measuring loss along both paths. Output: {out}/",
            soft_wrap=True,
        )
    with render.progress_bar(not (as_json or quiet) and render.interactive()) as progress:
        rep = run_demo(out, epochs=epochs, alphas=alphas, force=force, progress=progress)
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.merge_summary(rep)
        render.evaluation_summary(rep)


@app.command()
@_handled
def batch(
    plan: Annotated[Path, typer.Argument(help="YAML plan of merges and barriers.")],
    max_barrier: MaxBarrierOpt = None,
    as_json: JsonOpt = False,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help="Print one JSON line per item as it finishes.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run many merges/barriers from a plan; exit 1 if any item failed or any gate failed."""
    import json as _json

    from rebasin import render
    from rebasin.batch import load_plan, run_plan, summarize

    p = load_plan(plan)
    rows = []
    for row in run_plan(p, max_barrier):
        rows.append(row)
        if jsonl:
            sys.stdout.write(_json.dumps(row) + "\n")
            sys.stdout.flush()
    summary = summarize(p, rows)
    if as_json:
        _emit_json(summary)
    elif not (quiet or jsonl):
        render.batch_summary(summary)
    if summary["failed"]:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
