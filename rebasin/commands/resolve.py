"""One run, resolved once: :func:`resolve_run` turns a command's options and its loaded
checkpoints into a :class:`Run` (the model or why there is none, the data, the evaluation, the
verification or why it cannot run, the matcher and the outputs). Every stage after it takes the
Run and decides nothing again; ``--dry-run`` prints it.

The rules, each in one place:

- **Model**: ``--model``, else the architecture A records (built-in names only), else A's
  ``config.json``. A model the user names must resolve; a missing or refused record is kept as
  the error raised where a model is needed (evaluation, data-driven matching, tracing).
- **Evaluation**: ``barrier`` always evaluates. ``merge`` evaluates when given ``--data``, a
  BatchNorm fix (``--bn reset|repair``) or a gate (``--max-barrier``), or a model with data A
  records. Other commands never do. The data is ``--data``, else A's built-in data record.
- **BatchNorm**: ``auto`` is ``reset`` where the checkpoint holds BatchNorm statistics.
- **Matcher data**: a method that needs data fails now, naming what is missing; ``auto`` gets
  the data when the run evaluates.
- **Verification**: whenever a model can be built, unless ``--no-verify``. The model must fit
  the checkpoint as its own library loads it (buffers that library versions add or drop are
  tolerated by one rule, ``rebasin.models.fit.tolerated``); a model that does not fit is an error
  and nothing is written. Hugging Face models over ``VERIFY_BYTES`` are checked on the model cut
  to its first layer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rebasin.checkpoint import Checkpoint, load_checkpoint, read_hf_config
from rebasin.checkpoint.guard import Output, checkpoint_output, file_output, guard_outputs, plot_output
from rebasin.commands.cluster import connect
from rebasin.commands.inputs import check_device, check_pair
from rebasin.core.errors import ConfigError
from rebasin.core.types import PathLike
from rebasin.evaluate.setup import NO_DATA, DataPlan, EvalPlan
from rebasin.matching.registry import Matcher
from rebasin.models.reshape import check_recorded
from rebasin.models.resolve import ModelChoice, check_sizes, choose_model, recorded_data
from rebasin.options import Options
from rebasin.options.build import PLEAS
from rebasin.verify.plan import VerifyPlan, cut_for, skipped

EVALUATES = ("barrier", "merge", "diagnose", "star")
"""The commands that measure barrier curves: barrier always, merge when asked (others never)."""


@dataclass(frozen=True)
class Run:
    """Everything a command does, decided before any work: read by every stage, changed by none."""

    command: str
    options: Options
    checkpoints: tuple[Checkpoint, ...]
    model: ModelChoice
    data: DataPlan | None
    """The data the models run on; None when nothing runs the models on data."""
    evaluation: EvalPlan | None
    """The barrier curves measured; None when none are."""
    verification: VerifyPlan
    matcher: Matcher | None
    """None: no alignment (``--method none``), or a command that matches no pair."""
    matcher_data: bool
    """Whether the matcher gets the data side (models run on the training data)."""
    known_data: str | None = None
    """The data named or recorded (a refused record aside): inputs for tracing and probes."""
    outputs: tuple[Output, ...] = field(default=())
    notes: tuple[str, ...] = ()
    """What the run did on its own that people should know (buffers taken from A)."""
    existed: frozenset[str] = frozenset()
    """The outputs that existed before the run (replaced, not created, by it)."""

    @property
    def seed(self) -> int:
        return int(self.options.run.seed)

    @property
    def device(self) -> str:
        return str(self.options.run.device)


def command_outputs(command: str, opts: Options, out: PathLike | None) -> list[Output]:
    """The paths a command writes, as the output guard checks them."""
    o = opts.output
    report = [file_output(o.report, "--report")] if o.report else []
    if command == "merge":
        main = [checkpoint_output(out, "-o")] if out is not None else []
        permuted = [checkpoint_output(o.save_permuted, "--save-permuted")] if o.save_permuted else []
        return [*main, *permuted, *report]
    if command in ("barrier", "diagnose"):
        return [*([plot_output(o.plot)] if o.plot else []), *report]
    if command == "star":
        if out is None:
            raise ConfigError("star needs an output path (-o)")
        return [checkpoint_output(out, "-o"), *report]
    if command in ("permute", "merge-many"):
        if out is None:
            raise ConfigError(f"{command} needs an output path (-o)")
        return [checkpoint_output(out, "-o"), *report]
    if command == "spec" and out is not None:
        return [file_output(out, "-o")]
    return report


def option_inputs(opts: Options) -> list[Path]:
    """The files a run reads besides its checkpoints, named by options (a spec file, a data file,
    a model's Python file, a config): inputs the output guard protects like the checkpoints."""
    out = []
    for value in (
        opts.spec.spec,
        opts.evaluate.data,
        opts.model.model,
        opts.model.config,
        opts.evaluate.reference,
        opts.pleas.data_b,
        opts.pleas.data_free,
        None if opts.star.star_init == "random" else opts.star.star_init,
    ):
        if not isinstance(value, str):
            continue
        path = value.split(":", 1)[0] if ".py:" in value else value  # file.py:FACTORY names file.py
        if os.path.lexists(path):
            out.append(Path(path))
    return out


def resolve_run(command: str, opts: Options, paths: Sequence[PathLike], out: PathLike | None = None) -> Run:
    """Check the device and every output (before any work), load the checkpoints (headers only
    where the format allows), and decide the run (see the module's rules)."""
    check_device(opts.run.device)
    if command == "merge" and not opts.align:
        raise ConfigError("method 'none' aligns nothing: it applies to barriers, not merges")
    if command != "merge" and opts.method == PLEAS:
        raise ConfigError(
            "method 'pleas' makes a new model of another width: it applies to merges, not barriers",
            "give the merge an output (-o), then measure the merged model",
        )
    outputs = command_outputs(command, opts, out)
    guard_outputs(outputs, [*paths, *option_inputs(opts)], opts.output.force)
    existed = frozenset(str(o.path) for o in outputs if os.path.lexists(o.path))
    if command == "barrier" and opts.run.ray is not None:  # a missing package or cluster: one line now
        connect(opts.run.ray)
    loaded = [load_checkpoint(p) for p in paths]
    if opts.model.config is not None:
        config = read_hf_config(Path(opts.model.config))
        if config is None:
            raise ConfigError(
                "--config: not a Hugging Face config.json (no model_type or architectures)",
                source=opts.model.config,
            )
        for ck in loaded:
            ck.config = ck.config if ck.config is not None else config
    cks, notes = [loaded[0]], []
    for ck in loaded[1:]:
        fitted, said = check_pair(loaded[0], ck)
        cks.append(fitted)
        notes += said
    a = cks[0]
    try:
        known = _data_name(opts, a)
    except ConfigError:
        known = None  # a refused data record: raised where the data is needed
    model = choose_model(opts.model.model, opts.model.model_args, a.metadata, a.name, a.config)
    if model.ref is not None and model.source != "--model":  # sizes read from a file: bounded
        check_sizes(model.ref.config, model.ref.args, a.shapes, a.name)
        check_recorded(model.ref.shapes, a.shapes, a.name)
    matcher = opts.matcher if command in ("merge", "barrier", "diagnose") else None
    evaluation = _evaluation(command, opts, a, model)
    needs = matcher is not None and matcher.needs_data()
    if matcher is not None and needs:
        _check_data_for(matcher, opts, a, model)
    matcher_data = matcher is not None and matcher.wants_data() and (evaluation is not None or needs)
    data = _data_plan(opts, a) if evaluation is not None or matcher_data else None
    if data is not None:
        model.need()  # the models run on data: there must be one
    return Run(
        command=command,
        options=opts,
        checkpoints=tuple(cks),
        model=model,
        data=data,
        evaluation=evaluation,
        verification=_verification(opts, a, model, known) if command != "spec" else skipped(""),
        matcher=matcher,
        matcher_data=matcher_data,
        known_data=known,
        outputs=tuple(outputs),
        notes=tuple(notes),
        existed=existed,
    )


def _data_name(opts: Options, a: Checkpoint) -> str | None:
    """``--data``, else the built-in data set A records (a refused record raises)."""
    return opts.evaluate.data or recorded_data(a.metadata, a.name)


def _evaluation(command: str, opts: Options, a: Checkpoint, model: ModelChoice) -> EvalPlan | None:
    ev = opts.evaluate
    if command not in EVALUATES:
        return None
    if command in ("merge", "diagnose"):  # evaluated when asked (or data is recorded)
        asked = ev.data is not None or ev.bn in ("reset", "repair") or ev.max_barrier is not None
        recorded = model.source == "--model" and recorded_data(a.metadata, a.name) is not None
        if not (asked or recorded):
            return None
    if not _data_name(opts, a):
        raise ConfigError(f"no data: {NO_DATA}", source=a.name)
    return EvalPlan(alphas=ev.alphas, max_barrier=ev.max_barrier)


def _data_plan(opts: Options, a: Checkpoint) -> DataPlan:
    ev = opts.evaluate
    name = _data_name(opts, a)
    if not name:
        raise ConfigError(f"no data: {NO_DATA}", source=a.name)
    bn = ev.bn
    if bn == "auto":
        bn = "reset" if any(k.endswith("running_var") for k in a.shapes) else "none"
    return DataPlan(name, bn, ev.max_train, ev.eval_batch_size)


def _check_data_for(matcher: Matcher, opts: Options, a: Checkpoint, model: ModelChoice) -> None:
    """A method that runs the models: say exactly what is missing (data, or a model)."""
    what = matcher.label()
    if not _data_name(opts, a):
        raise ConfigError(f"{what} needs data to run both models on: {NO_DATA}", source=a.name)
    if model.ref is None and not model.refused:
        raise ConfigError(
            f"{what} runs the models: pass --model NAME or MODULE:FACTORY "
            "(the checkpoint records no architecture)",
            source=a.name,
        )


def _verification(opts: Options, ck: Checkpoint, model: ModelChoice, probe: str | None) -> VerifyPlan:
    """How each permutation the run writes is checked, or why it cannot be."""
    if opts.output.no_verify:
        return skipped("not verified: --no-verify")
    if model.ref is None:
        if model.refused:
            return skipped("not verified: the checkpoint's architecture record is refused")
        return skipped("not verified: no model (pass --model to verify)")
    cut = cut_for(model.ref, 4 * ck.num_parameters())
    if isinstance(cut, str):
        return skipped(cut)
    return VerifyPlan(model.ref, probe, cut)


def describe(run: Run) -> dict[str, Any]:
    """The resolved run, as ``--dry-run`` prints it (without the spec and the estimates)."""
    m = run.model
    return {
        "command": run.command,
        "inputs": [str(c.path) for c in run.checkpoints],
        "model": {"name": m.ref.name, "from": m.source}
        if m.ref
        else {"none": m.error.line() if m.error else ""},
        "method": run.matcher.describe() if run.matcher else None,
        "options": run.matcher.to_dict() if run.matcher else {},
        "matcher_data": run.matcher_data,
        "data": run.data.describe() if run.data else None,
        "evaluation": run.evaluation.describe() if run.evaluation else None,
        "verification": run.verification.describe(),
        "outputs": [{"path": str(o.path), "role": o.role, "kind": o.kind} for o in run.outputs],
    }
