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
    typer.Option("--spec", help="auto (infer from names), a family name (mlp, vgg, resnet) or a spec file."),
]
ShardOpt = Annotated[
    str | None,
    typer.Option("--shard-size", help="Split outputs above this size (e.g. 2GB) into shards with an index."),
]


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
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Align B to A and write (1 - alpha) A + alpha pi(B)."""
    from rebasin import render
    from rebasin.pipeline import MergeOptions, merge_checkpoints
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
    )
    with render.progress_bar(not (as_json or quiet) and render.interactive()) as progress:
        rep = merge_checkpoints(a, b, output, opts, progress)
    if report is not None:
        write_report(rep, report)
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.merge_summary(rep)


@app.command()
@_handled
def permute(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to permute.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the permuted checkpoint.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random permutation.")] = 0,
    spec: SpecOpt = "auto",
    shard_size: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a random, function-preserving permutation of a checkpoint."""
    from rebasin import render
    from rebasin.pipeline import permute_checkpoint

    rep = permute_checkpoint(checkpoint, output, seed, spec, force=force, shard_size=shard_size)
    if as_json:
        _emit_json(rep)
    elif not quiet:
        render.permute_summary(rep)


@app.command("spec")
@_handled
def spec_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint whose spec to show.")],
    spec: SpecOpt = "auto",
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
    s, source, fixed = describe_spec(checkpoint, spec)
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
