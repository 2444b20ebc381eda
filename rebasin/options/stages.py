"""The option stages of a run: seed and device, model, spec, method, merge, evaluation, training,
outputs and the console. Every option of every command is declared here once (a matching
method's own options on its registered class, ``rebasin.matching.methods``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rebasin.core.fields import EPOCHS_HELP, LR_HELP, SEED_HELP, Checked, option
from rebasin.core.sizes import parse_size
from rebasin.matching.registry import DEFAULT_METHOD, list_matchers

MODEL_COMMANDS = ("merge", "barrier", "diagnose", "star", "permute", "spec")
ALIGN_COMMANDS = ("merge", "barrier", "diagnose")
SPEC_COMMANDS = ("merge", "barrier", "diagnose", "star", "permute", "merge-many", "spec")
DRY_RUN_COMMANDS = ("merge", "barrier", "permute", "merge-many", "batch")
REPORT_COMMANDS = (
    "merge",
    "barrier",
    "diagnose",
    "star",
    "permute",
    "merge-many",
    "spec",
    "inspect",
    "train",
    "demo",
    "batch",
)


def _methods() -> list[str]:

    return list_matchers()


@dataclass(frozen=True)
class RunOptions(Checked):
    """Seed, device and where the work runs: shared by every stage that draws random numbers or
    computes."""

    seed: int = option(
        0,
        SEED_HELP,
        ge=0,
        commands=("merge", "barrier", "diagnose", "star", "permute", "merge-many", "train"),
    )
    device: str = option(
        "cpu",
        "Torch device for cost matrices and model evaluation (cpu, cuda, cuda:1, mps).",
        commands=("merge", "barrier", "diagnose", "star", "merge-many"),
    )
    ray: str | None = option(
        None,
        "Run on a Ray cluster: a barrier's alpha points or a plan's items as Ray tasks. local (a "
        "private instance on this machine), auto (the cluster this machine belongs to) or a cluster "
        "ADDRESS. Needs the [ray] extra.",
        metavar="local|auto|ADDRESS",
        commands=("barrier", "batch"),
        plan=False,
    )
    allow_code: bool = option(
        False,
        "Let a plan's model and data keys import and run the code they name (MODULE:NAME, file.py:NAME).",
        commands=("batch",),
        plan=False,
    )


@dataclass(frozen=True)
class ModelOptions(Checked):
    """Which model to build: traced for a spec, run on data, trained. Both options may import user
    code."""

    model: str | None = option(
        None,
        "Built-in model (mlp, vgg, resnet20, resnet, transformer), MODULE:FACTORY or "
        "file.py:FACTORY (imports and runs that code).",
        commands=(*MODEL_COMMANDS, "train"),
        default_text="A's rebasin.arch, else config.json; train: mlp",
        command_defaults={"train": "mlp"},
    )
    model_args: dict[str, Any] | None = option(
        None,
        "JSON object of the model factory's keyword arguments.",
        metavar="JSON",
        commands=(*MODEL_COMMANDS, "train"),
        default_text="A's rebasin.arch_args",
    )
    config: str | None = option(
        None,
        "A Hugging Face config.json for checkpoints that come without one (head counts, architecture).",
        metavar="FILE",
        commands=SPEC_COMMANDS,
        default_text="config.json beside the weights",
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
        commands=("merge", "barrier", "diagnose", "merge-many", "permute"),
    )


@dataclass(frozen=True)
class MethodOptions(Checked):
    """How the permutation is found: a registered matching method (its own options are declared
    on its class). ``auto`` is the default of commands and plans; ``rebasin.match()``, which gets
    no model or data, defaults to ``weight``."""

    method: str = option(
        DEFAULT_METHOD,
        "How to find the permutation (docs/algorithms.md); barrier: none draws the naive path only.",
        choices=_methods,
        commands=("merge", "barrier", "diagnose"),
        extra_choices={"barrier": ("none",), "batch": ("none", "pleas"), "merge": ("pleas",)},
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
class PleasOptions(Checked):
    """A PLeaS merge (``merge --method pleas``): a new model of a chosen width from A and B,
    partially matched and refitted layer by layer by least squares."""

    width: float | None = option(
        None,
        "--method pleas: merged width as a multiple of A's, for every group PLeaS widens "
        "(1.0: every unit merged; 2.0: none, the ensemble).",
        ge=1.0,
        le=2.0,
        commands=("merge",),
        default_text="1.5",
    )
    group_width: tuple[str, ...] = option(
        (),
        "--method pleas: the width of the groups matching GROUP (a glob, as --freeze takes); "
        "repeatable; a transformer's residual stream widens only when named.",
        metavar="GROUP=W",
        commands=("merge",),
    )
    budget_params: int | None = option(
        None,
        "--method pleas: pick the widest uniform width whose merged model has at most N parameters "
        "(instead of --width).",
        ge=1,
        metavar="N",
        commands=("merge",),
    )
    task_heads: str = option(
        "shared",
        "--method pleas: shared (one label space: the logits are merged) or separate (both "
        "classifier heads kept: the merged model returns A's task's logits, then B's).",
        choices=("shared", "separate"),
        commands=("merge",),
    )
    data_b: str | None = option(
        None,
        "--method pleas: B's task's data (as --data takes); the features come from both data sets.",
        metavar="DATA",
        commands=("merge",),
        default_text="--data",
    )
    data_free: str | None = option(
        None,
        "--method pleas: take the features for matching and least squares from this data's inputs "
        "instead of the tasks' (the data-free variant); --data then only evaluates.",
        metavar="SOURCE",
        commands=("merge",),
    )


@dataclass(frozen=True)
class EvalOptions(Checked):
    """The data the models run on, and how they are evaluated (``barrier``, ``merge --data``)."""

    data: str | None = option(
        None,
        "mnist1d, digits, synthetic, a .safetensors/.npz file (x and y; input_ids, attention_mask, "
        "labels; pixel_values and labels), or MODULE:FUNCTION (imports and runs that code).",
        commands=(*ALIGN_COMMANDS, "star", "train"),
        default_text="A's rebasin.data; train: mnist1d",
        command_defaults={"train": "mnist1d"},
    )
    alphas: int = option(
        25, "Points on the interpolation grid.", ge=2, commands=(*ALIGN_COMMANDS, "star", "demo")
    )
    bn: str = option(
        "auto",
        "BatchNorm handling: auto (reset where the model has BatchNorm), none, reset, repair.",
        choices=("auto", "none", "reset", "repair"),
        commands=(*ALIGN_COMMANDS, "star"),
    )
    max_train: int | None = option(
        None, "Use at most N training examples.", ge=1, metavar="N", commands=("barrier", "diagnose", "star")
    )
    max_barrier: float | None = option(
        None,
        "Exit 1 if the aligned test loss barrier exceeds this (batch: for the items that set none).",
        commands=("merge", "barrier", "batch"),
    )
    reference: str | None = option(
        None,
        "More than two models: align each once to this checkpoint and compare pairs in its coordinates.",
        metavar="PATH",
        commands=("barrier",),
        plan=False,
    )
    basin_threshold: float = option(
        0.1,
        "More than two models: models joined by an aligned test loss barrier below this share a basin.",
        ge=0.0,
        commands=("barrier",),
        plan=False,
    )
    top_k: int = option(
        8,
        "diagnose, merge --diagnose: singular directions compared per weight tensor.",
        ge=1,
        commands=("diagnose", "merge"),
        plan=False,
    )
    diagnose: bool = option(
        False,
        "Also report the agreement of A's and pi(B)'s top singular directions per weight tensor "
        "(and with data the barrier of each layer alone), as rebasin diagnose does.",
        commands=("merge",),
        plan=False,
    )
    eval_batch_size: int = option(1000, "Examples per evaluation batch.", ge=1, plan=False)


@dataclass(frozen=True)
class TrainOptions(Checked):
    """How ``train`` (and ``demo``) train a model: AdamW with a one-cycle schedule."""

    epochs: int = option(20, EPOCHS_HELP, ge=1, commands=("train", "demo"), plan=False)
    lr: float = option(1e-3, LR_HELP, gt=0.0, commands=("train",), plan=False)
    batch_size: int = option(128, "Training mini-batch size.", ge=1, commands=("train",), plan=False)
    weight_decay: float = option(0.0, "AdamW weight decay.", ge=0.0, commands=("train",), plan=False)


@dataclass(frozen=True)
class OutputOptions(Checked):
    """Where results go. Every path passes the output guard before any work starts."""

    output: str | None = option(
        None,
        "Output: a checkpoint (.safetensors, or a directory); demo: the folder for all it writes.",
        short="-o",
        metavar="PATH",
        commands=("merge", "permute", "merge-many", "star", "spec", "train", "demo"),
        command_defaults={"demo": "rebasin-demo"},
    )
    save_permuted: str | None = option(None, "Also write pi(B) alone.", metavar="PATH", commands=("merge",))
    report: str | None = option(
        None,
        "Write the JSON report here.",
        metavar="PATH",
        commands=("merge", "barrier", "diagnose", "star", "merge-many"),
    )
    plot: str | None = option(
        None,
        "Write the curves (diagnose: its figure) as PNG (and SVG beside it).",
        metavar="PATH.png",
        commands=("barrier", "diagnose"),
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
        "Replace existing outputs (never an input).",
        commands=("merge", "barrier", "diagnose", "star", "permute", "merge-many", "spec", "train", "demo"),
    )
    no_verify: bool = option(
        False,
        "Skip the check that the permuted model computes what the original computes "
        "(run on a probe batch whenever a model can be built).",
        commands=("merge", "barrier", "diagnose", "permute", "merge-many"),
    )
    dry_run: bool = option(
        False,
        "Read headers only, resolve and print the run (what is matched, evaluated and verified, "
        "every output, the estimated time and memory), check every output; write nothing.",
        commands=DRY_RUN_COMMANDS,
        plan=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_size(self.shard_size)


@dataclass(frozen=True)
class ConsoleOptions(Checked):
    """What the command prints: results on stdout, messages for people on stderr."""

    json: bool = option(
        False, "Print the report as JSON on stdout, nothing else.", commands=REPORT_COMMANDS, plan=False
    )
    jsonl: bool = option(
        False, "Print one JSON line per item as it finishes.", commands=("batch",), plan=False
    )
    quiet: bool = option(
        False,
        "No tables or progress on stderr.",
        short="-q",
        commands=tuple(c for c in REPORT_COMMANDS if c != "inspect"),
        plan=False,
    )


@dataclass(frozen=True)
class StarOptions(Checked):
    """How ``star`` trains a star model (Starlight): its own names, so no option of another
    command changes meaning."""

    star_steps: int = option(1000, "Optimizer steps of star training.", ge=0, commands=("star",))
    refresh: int = option(
        50,
        "Steps between re-aligning the sources to the star model (weight matching).",
        ge=1,
        commands=("star",),
    )
    star_init: str = option(
        "random",
        "Where the star model starts: random (the model's initialization, seeded) or a checkpoint.",
        flag="--init",
        metavar="PATH|random",
        commands=("star",),
    )
    star_lr: float = option(1e-3, "Adam learning rate of star training.", gt=0.0, commands=("star",))
    held_out: tuple[str, ...] = option(
        (),
        "A model not trained on, whose barrier to the star model is reported (repeatable).",
        metavar="PATH",
        commands=("star",),
    )
    average: int | None = option(
        None,
        "Also evaluate the Bayesian model average of K random points of the star domain.",
        ge=1,
        metavar="K",
        commands=("star",),
    )
    resume: bool = option(
        False, "Continue from the state file kept beside the output (OUT.star-state.pt).", commands=("star",)
    )


STAGES: dict[str, type] = {
    "run": RunOptions,
    "model": ModelOptions,
    "spec": SpecOptions,
    "method": MethodOptions,
    "merge": MergeOptions,
    "pleas": PleasOptions,
    "evaluate": EvalOptions,
    "train": TrainOptions,
    "star": StarOptions,
    "output": OutputOptions,
    "console": ConsoleOptions,
}
