"""The typed options model: every option of every command, declared once.

Each stage of the flow has a frozen dataclass (run, model, spec, match, merge, evaluate, output);
each field is declared with :func:`option`, which records its command-line flag, help, bounds and
the commands that take it. The command line (``rebasin.cli``), batch plan keys (``rebasin.batch``),
the options table in ``docs/options.md`` and the Python API all derive from these classes, and
every value is checked here, in :func:`check_value`, whoever supplies it.

Matching methods declare their own options on their registered matcher class
(``rebasin.matching.methods``); an option given for a method that does not use it is an error
naming the methods that do.

This module imports no torch: ``rebasin --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rebasin.errors import ConfigError

# ------------------------------------------------------------------------------- declaring options

_META = "rebasin.option"


@dataclass(frozen=True)
class OptionInfo:
    """Everything known about one option (derived from its dataclass field)."""

    name: str
    """Python attribute and batch plan key."""
    stage: str
    kind: type
    """``int``, ``float``, ``str``, ``bool``, ``list`` (of strings) or ``dict`` (a JSON object)."""
    default: Any
    help: str
    flag: str
    short: str | None = None
    choices: tuple[str, ...] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    metavar: str | None = None
    commands: tuple[str, ...] = ()
    plan: bool = True
    methods: tuple[str, ...] | None = None
    """For a matcher's own options: the methods that use it (None: every method)."""
    default_text: str | None = None
    """How the docs and help show the default, where the value alone would mislead."""

    def label(self, style: str) -> str:
        """How errors name the option: ``--max-iter`` on the command line, ``'max_iter'`` in a plan."""
        return self.flag if style == "cli" else f"'{self.name}'"


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    choices: Sequence[str] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    metavar: str | None = None,
    commands: Sequence[str] = (),
    plan: bool = True,
    default_text: str | None = None,
) -> Any:
    """Declare a dataclass field as an option (see :class:`OptionInfo` for the meanings)."""
    meta = {
        "help": help,
        "flag": flag,
        "short": short,
        "choices": tuple(choices) if choices is not None else None,
        "ge": ge,
        "gt": gt,
        "le": le,
        "metavar": metavar,
        "commands": tuple(commands),
        "plan": plan,
        "default_text": default_text,
    }
    if isinstance(default, list | dict):
        raise TypeError("use a tuple or None as the default of a list or mapping option")
    return field(default=default, metadata={_META: meta})


def _kind(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _kind(args[0])
    if origin in (tuple, list) or annotation in (tuple, list):
        return list
    if origin in (dict, Mapping) or annotation is dict:
        return dict
    if annotation in (int, float, str, bool):
        return typing.cast(type, annotation)
    raise TypeError(f"unsupported option type {annotation!r}")


def options_of(cls: type, stage: str, methods: tuple[str, ...] | None = None) -> list[OptionInfo]:
    """The options a dataclass declares, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        out.append(
            OptionInfo(
                name=f.name,
                stage=stage,
                kind=_kind(hints[f.name]),
                default=f.default,
                methods=methods,
                **{**meta, "flag": flag},
            )
        )
    return out


# ------------------------------------------------------------------------------- checking values


def _plain(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_value(info: OptionInfo, value: Any, style: str = "cli") -> Any:
    """Check one value against its option (type, choices, bounds, finiteness) and return it in the
    option's own type (lists become tuples, JSON text for a mapping is parsed). ``style`` says how
    the message names the option (see :meth:`OptionInfo.label`)."""
    name = info.label(style)
    if value is None:
        return None
    kind = info.kind
    if kind is dict and isinstance(value, str):
        value = parse_json_object(value, name)
    if kind is list and isinstance(value, str):
        value = [value]
    if kind is list and isinstance(value, tuple):
        value = list(value)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{name} must be {kind.__name__}, got {_plain(value)}")
    if kind is list:
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {_plain(value)}")
        value = tuple(value)
    if info.choices is not None and value not in info.choices:
        raise ConfigError(f"{name} must be one of {', '.join(info.choices)}, got {_plain(value)}")
    if kind in (int, float):
        _check_number(info, name, value)
    return value


def _check_number(info: OptionInfo, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if info.ge is not None and info.le is not None and not info.ge <= value <= info.le:
        raise ConfigError(f"{name} must lie in [{_num(info.ge)}, {_num(info.le)}], got {value}")
    if info.ge is not None and value < info.ge:
        raise ConfigError(f"{name} must be at least {_num(info.ge)}, got {value}")
    if info.gt is not None and value <= info.gt:
        raise ConfigError(f"{name} must be greater than {_num(info.gt)}, got {value}")
    if info.le is not None and value > info.le:
        raise ConfigError(f"{name} must be at most {_num(info.le)}, got {value}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def parse_json_object(text: str, name: str = "--model-args") -> dict[str, Any]:
    """A JSON object given as text (``--model-args '{"hidden": 512}'``) as a dict."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object, e.g. '{{\"hidden\": 512}}'")
    return value


def parse_size(text: str | int | None) -> int | None:
    """Parse '500MB', '2GB', '1GiB' or a byte count; None stays None."""
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text <= 0:
            raise ConfigError(f"invalid size '{text}' (must be positive)")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"invalid size '{text}' (use e.g. 500MB, 2GB, 1GiB)")
    value = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("B").rstrip("I")]
    size = int(value * base**power)
    if size <= 0:
        raise ConfigError(f"invalid size '{text}' (must be positive)")
    return size


class Checked:
    """Mixin for option dataclasses: every declared option is checked on construction."""

    def __post_init__(self) -> None:
        for info in options_of(type(self), ""):
            value = check_value(info, getattr(self, info.name), "cli")
            object.__setattr__(self, info.name, value)


# ------------------------------------------------------------------------------- the stages

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


# ------------------------------------------------------------------------------- all options


def matcher_options() -> list[OptionInfo]:
    """Every matcher's own options, one entry per name (with the methods that use it)."""
    from rebasin.matching.registry import MATCHERS, Matcher

    base = {i.name: i for i in options_of(Matcher, "match")}
    by_name: dict[str, OptionInfo] = dict(base)
    users: dict[str, list[str]] = {}
    for name, cls in MATCHERS.items():
        for info in options_of(cls, "match"):
            if info.name in base:
                continue
            users.setdefault(info.name, []).append(name)
            if info.name not in by_name:
                by_name[info.name] = info
    out = []
    for name, info in by_name.items():
        if name in users:
            info = dataclasses.replace(info, methods=tuple(users[name]), default=None)
        out.append(info)
    return out


def all_options() -> list[OptionInfo]:
    """Every option, stage by stage (the order of the docs table)."""
    out: list[OptionInfo] = []
    for stage, cls in STAGES.items():
        out += options_of(cls, stage)
        if stage == "spec":
            out += matcher_options()
    return out


def for_command(command: str) -> list[OptionInfo]:
    """The options a command takes."""
    return [o for o in all_options() if command in o.commands]


def plan_options() -> list[OptionInfo]:
    """The options a batch plan item may set."""
    return [o for o in all_options() if o.plan]


# ------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Options:
    """Everything one run needs, stage by stage. ``evaluate`` is None when nothing is evaluated."""

    run: RunOptions = field(default_factory=RunOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    spec: SpecOptions = field(default_factory=SpecOptions)
    match: Any = None
    """The configured matcher (a registered :class:`rebasin.matching.registry.Matcher`); None:
    weight matching with its defaults."""
    merge: MergeOptions = field(default_factory=MergeOptions)
    evaluate: EvalOptions | None = None
    output: OutputOptions = field(default_factory=OutputOptions)
    align: bool = True
    """False: measure the naive path only (``barrier --method none``, plan ``align: false``)."""

    @property
    def matcher(self) -> Any:
        """The matcher to run (weight matching by default)."""
        if self.match is not None:
            return self.match
        from rebasin.matching.registry import MATCHERS

        return MATCHERS.get("weight")()


def build_options(
    values: Mapping[str, Any], command: str, style: str = "cli", evaluate: str = "auto"
) -> Options:
    """Turn flat ``values`` (option name -> value; absent or None means the default) into checked
    :class:`Options`. ``method`` picks the matcher; its own options may only be given for it.
    ``evaluate``: ``auto`` (evaluate when data, a model, a BatchNorm fix or a gate asks for it),
    ``always`` or ``never``. Raises ConfigError naming the first bad option."""
    from rebasin.matching.registry import MATCHERS

    given = {k: v for k, v in values.items() if v is not None and v != ()}
    known = {o.name: o for o in all_options()} | {"method": None, "align": None}
    for k in given:
        if k not in known:
            raise ConfigError(f"unknown option '{k}'")
    method = given.pop("method", "weight")
    if method not in MATCHERS:
        raise MATCHERS.unknown(method)
    align = bool(given.pop("align", True))
    stages: dict[str, Any] = {}
    for stage, cls in STAGES.items():
        infos = options_of(cls, stage)
        kw = {i.name: check_value(i, given.pop(i.name), style) for i in infos if i.name in given}
        stages[stage] = _construct(cls, kw, style)
    matcher = make_matcher(method, given, style)
    ev: EvalOptions = stages["evaluate"]
    model: ModelOptions = stages["model"]
    wanted = {
        "always": True,
        "never": False,
        "auto": ev.data is not None
        or model.model is not None
        or ev.bn in ("reset", "repair")
        or ev.max_barrier is not None,
    }[evaluate]
    return Options(
        run=stages["run"],
        model=model,
        spec=stages["spec"],
        match=matcher,
        merge=stages["merge"],
        evaluate=ev if wanted else None,
        output=stages["output"],
        align=align,
    )


def make_matcher(method: str, values: Mapping[str, Any], style: str = "cli") -> Any:
    """The registered matcher ``method`` configured with ``values``; an option of another method
    is an error naming the methods that use it."""
    from rebasin.matching.registry import MATCHERS

    cls = MATCHERS.get(method)
    own = {i.name: i for i in options_of(cls, "match")}
    kw = {}
    for k, v in values.items():
        if v is None:
            continue
        if k not in own:
            users = [n for n, c in MATCHERS.items() if k in {i.name for i in options_of(c, "match")}]
            label = next((o.label(style) for o in matcher_options() if o.name == k), repr(k))
            if not users:
                raise ConfigError(f"unknown option {label} for method '{method}'")
            raise ConfigError(f"{label} does not apply to method '{method}' (used by: {', '.join(users)})")
        kw[k] = check_value(own[k], v, style)
    return _construct(cls, kw, style)


def _construct(cls: type, kw: dict[str, Any], style: str) -> Any:
    try:
        return cls(**kw)
    except ConfigError as e:
        if style == "cli":
            raise
        # name plan keys, not flags, in messages raised by __post_init__
        message = e.message
        for info in options_of(cls, ""):
            message = message.replace(info.flag, f"'{info.name}'")
        raise ConfigError(message, e.hint, source=e.source) from None


def describe_defaults(info: OptionInfo) -> str:
    """The default as the docs table shows it."""
    if info.default_text:
        return info.default_text
    if info.methods is not None:
        return _method_defaults(info)
    if info.default is None or info.default == ():
        return ""
    if isinstance(info.default, bool):
        return "off" if not info.default else "on"
    return str(info.default)


def _method_defaults(info: OptionInfo) -> str:
    from rebasin.matching.registry import MATCHERS

    parts = []
    for name in info.methods or ():
        for i in options_of(MATCHERS.get(name), "match"):
            if i.name == info.name:
                d = i.default_text or ("" if i.default is None else str(i.default))
                if d:
                    parts.append(f"{d} ({name})")
    return ", ".join(parts)


def iter_stage_values(obj: Any) -> Iterator[tuple[str, Any]]:
    """(name, value) of every declared option of an options object (for reports)."""
    for info in options_of(type(obj), ""):
        yield info.name, getattr(obj, info.name)


def options_table() -> str:
    """The options table of ``docs/options.md`` (generated; a test keeps the file current)."""
    rows = [
        "| option | plan key | commands | methods | default | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for o in all_options():
        if not o.commands and not o.plan:
            continue
        flag = f"`{o.flag}`" + (f", `{o.short}`" if o.short else "")
        if o.choices:
            flag += " " + "\\|".join(f"`{c}`" for c in o.choices)
        key = f"`{o.name}`" if o.plan else ""
        commands = ", ".join(o.commands) or "API only"
        methods = ", ".join(o.methods) if o.methods else "all"
        default = describe_defaults(o).replace("|", "\\|")
        rows.append(f"| {flag} | {key} | {commands} | {methods} | {default} | {o.help} |")
    return "\n".join(rows) + "\n"


def write_options_doc(path: str) -> None:
    """Regenerate the table between the markers of ``docs/options.md``."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    start, end = "<!-- options-table:start -->\n", "<!-- options-table:end -->"
    head, rest = text.split(start)
    tail = rest[rest.index(end) :]
    p.write_text(head + start + options_table() + tail)
