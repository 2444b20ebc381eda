"""The option stages of a run: seed and device, model, spec, merge, evaluation, outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rebasin.core.fields import Checked, option, parse_size

MODEL_COMMANDS = ("merge", "barrier", "permute", "spec")
ALIGN_COMMANDS = ("merge", "barrier")
SPEC_COMMANDS = ("merge", "barrier", "permute", "merge-many", "spec")


@dataclass(frozen=True)
class RunOptions(Checked):
    """Seed and device: shared by every stage that draws random numbers or computes."""

    seed: int = option(
        0,
        "Seed of group orders, restarts, random permutations and data order.",
        ge=0,
        commands=("merge", "barrier", "permute", "merge-many"),
    )
    device: str = option(
        "cpu",
        "Torch device for cost matrices and model evaluation (cpu, cuda, cuda:1, mps).",
        commands=("merge", "barrier", "merge-many"),
    )
    ray: str | None = option(
        None,
        "Evaluate the alpha points as Ray tasks: local (a private instance on this machine), "
        "auto (the cluster this machine belongs to) or a cluster ADDRESS. Needs the [ray] extra.",
        metavar="local|auto|ADDRESS",
        commands=("barrier",),
        plan=False,
    )


@dataclass(frozen=True)
class ModelOptions(Checked):
    """Which model to build: traced for a spec, run on data. Both options import user code."""

    model: str | None = option(
        None,
        "Built-in model (mlp, vgg, resnet20, resnet, transformer), MODULE:FACTORY or "
        "file.py:FACTORY (imports and runs that code).",
        commands=MODEL_COMMANDS,
        default_text="A's rebasin.arch, else config.json",
    )
    model_args: dict[str, Any] | None = option(
        None,
        "JSON object of the model factory's keyword arguments.",
        metavar="JSON",
        commands=MODEL_COMMANDS,
        default_text="A's rebasin.arch_args",
    )


@dataclass(frozen=True)
class SpecOptions(Checked):
    """Where the permutation groups come from, and which stay fixed."""

    spec: str = option(
        "auto",
        "auto (trace --model if given, else infer from names), trace, a family name "
        "(mlp, vgg, resnet, transformer, gpt2, llama, bert, vit) or a spec file.",
        commands=SPEC_COMMANDS,
    )
    freeze: tuple[str, ...] = option(
        (),
        "Keep groups matching this glob fixed (repeatable), e.g. residual or 'layers.*.attn.*'.",
        metavar="GROUP_PATTERN",
        commands=("merge", "barrier", "merge-many", "permute"),
    )


@dataclass(frozen=True)
class MergeOptions(Checked):
    """How the aligned models are combined."""

    alpha: float = option(
        0.5, "Weight of B: (1 - alpha) A + alpha pi(B).", ge=0.0, le=1.0, commands=("merge",)
    )
    max_rounds: int = option(
        20, "Most MergeMany rounds over all models.", ge=1, commands=("merge-many",), plan=False
    )


@dataclass(frozen=True)
class EvalOptions(Checked):
    """What the models are evaluated on, and how (``barrier``, ``merge --data``)."""

    data: str | None = option(
        None,
        "mnist1d, digits, synthetic, a .safetensors/.npz file (x, y or input_ids), or "
        "MODULE:FUNCTION (imports and runs that code).",
        commands=ALIGN_COMMANDS,
        default_text="A's rebasin.data",
    )
    alphas: int = option(25, "Points on the interpolation grid.", ge=2, commands=ALIGN_COMMANDS)
    bn: str = option(
        "auto",
        "BatchNorm handling: auto (reset where the model has BatchNorm), none, reset, repair.",
        choices=("auto", "none", "reset", "repair"),
        commands=ALIGN_COMMANDS,
    )
    max_train: int | None = option(
        None, "Use at most N training examples.", ge=1, metavar="N", commands=("barrier",)
    )
    max_barrier: float | None = option(
        None, "Exit 1 if the aligned test loss barrier exceeds this.", commands=ALIGN_COMMANDS
    )
    batch_size: int = option(1000, "Evaluation batch size.", ge=1, plan=False)


@dataclass(frozen=True)
class OutputOptions(Checked):
    """Where results go. Every path passes the output guard before any work starts."""

    output: str | None = option(
        None,
        "Output checkpoint (.safetensors, or a directory).",
        short="-o",
        metavar="PATH",
        commands=("merge", "permute", "merge-many", "spec"),
    )
    save_permuted: str | None = option(None, "Also write pi(B) alone.", metavar="PATH", commands=("merge",))
    report: str | None = option(
        None, "Write the JSON report here.", metavar="PATH", commands=("merge", "barrier", "merge-many")
    )
    plot: str | None = option(
        None,
        "Write the curves as PNG (and SVG beside it).",
        metavar="PATH.png",
        commands=("barrier",),
        plan=False,
    )
    shard_size: str | None = option(
        None,
        "Split outputs above this size (e.g. 2GB) into shards with an index.",
        metavar="SIZE",
        commands=("merge", "permute", "merge-many"),
    )
    force: bool = option(
        False,
        "Overwrite existing output files.",
        commands=("merge", "barrier", "permute", "merge-many", "spec"),
    )
    no_verify: bool = option(
        False,
        "Skip the check that the permuted model computes what the original computes "
        "(run on a probe batch whenever a model can be built).",
        commands=("merge", "barrier", "permute", "merge-many"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_size(self.shard_size)


STAGES: dict[str, type] = {
    "run": RunOptions,
    "model": ModelOptions,
    "spec": SpecOptions,
    "merge": MergeOptions,
    "evaluate": EvalOptions,
    "output": OutputOptions,
}
