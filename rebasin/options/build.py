"""Every option of every command, and turning flat values (command line, plan item, API) into
:class:`Options`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rebasin.core.errors import ConfigError
from rebasin.core.fields import OptionInfo, check_value, construct, options_of
from rebasin.matching.registry import Matcher, make_matcher, matcher_options
from rebasin.options.stages import (
    STAGES,
    ConsoleOptions,
    EvalOptions,
    MergeOptions,
    MethodOptions,
    ModelOptions,
    OutputOptions,
    PleasOptions,
    RunOptions,
    SpecOptions,
    StarOptions,
    TrainOptions,
)

NO_ALIGNMENT = "none"
"""The ``--method`` value that aligns nothing (``barrier``, plan items that measure a barrier)."""
PLEAS = "pleas"
"""The ``merge --method`` that makes a new model of another width (not a matcher)."""
PLEAS_MATCHER = "activation"
"""How a PLeaS merge matches the units before it chooses which to merge."""


def all_options() -> list[OptionInfo]:
    """Every option, stage by stage (the order of the docs table); a matching method's own
    options follow the method."""
    out: list[OptionInfo] = []
    for stage, cls in STAGES.items():
        out += options_of(cls, stage)
        if stage == "method":
            out += matcher_options()
    return out


def for_command(command: str) -> list[OptionInfo]:
    """The options a command takes (one per name)."""
    seen: dict[str, OptionInfo] = {}
    for o in all_options():
        if command in o.commands and o.name not in seen:
            seen[o.name] = o
    return list(seen.values())


def plan_options() -> list[OptionInfo]:
    """The options a batch plan item may set (one per name)."""
    seen: dict[str, OptionInfo] = {}
    for o in all_options():
        if o.plan and o.name not in seen:
            seen[o.name] = o
    return list(seen.values())


@dataclass(frozen=True)
class Options:
    """Everything one run needs, stage by stage, as the user gave it. What the run then does with
    them (is there a model, data, an evaluation, a verification?) is decided once, by
    :func:`rebasin.commands.resolve.resolve_run`."""

    run: RunOptions = field(default_factory=RunOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    spec: SpecOptions = field(default_factory=SpecOptions)
    method: str = MethodOptions().method
    """The matching method's name (``auto`` for commands and plans), or ``none``: no alignment."""
    match: Matcher | None = None
    """The configured matcher; None: the method's defaults (none at all for ``none``)."""
    merge: MergeOptions = field(default_factory=MergeOptions)
    pleas: PleasOptions = field(default_factory=PleasOptions)
    evaluate: EvalOptions = field(default_factory=EvalOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    star: StarOptions = field(default_factory=StarOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    console: ConsoleOptions = field(default_factory=ConsoleOptions)

    def __post_init__(self) -> None:
        if self.match is not None and self.method != PLEAS:  # a configured matcher names its method
            object.__setattr__(self, "method", self.match.name)

    @property
    def align(self) -> bool:
        """Whether B is aligned at all (False for ``--method none``)."""
        return self.method != NO_ALIGNMENT

    @property
    def matcher(self) -> Matcher | None:
        """The matcher to run: the configured one, else the method's defaults; None without
        alignment."""
        if not self.align:
            return None
        if self.match is not None:
            return self.match
        return make_matcher(PLEAS_MATCHER if self.method == PLEAS else self.method, {})


def build_options(values: Mapping[str, Any], command: str, style: str = "cli") -> Options:
    """Turn flat ``values`` (option name -> value; absent or None means the command's default)
    into checked :class:`Options` for ``command``. ``method`` picks the matcher; its own options
    may only be given for it. Raises ConfigError naming the first bad option."""
    given = {k: v for k, v in values.items() if v is not None and v != ()}
    known = {o.name for o in all_options()}
    for k in given:
        if k not in known:
            raise ConfigError(f"unknown option '{k}'")
    by_matchers = {o.name for o in matcher_options()}
    stages: dict[str, Any] = {}
    for stage, cls in STAGES.items():
        kw = {}
        for info in options_of(cls, stage):
            mine = not info.commands or command in info.commands or info.name not in by_matchers
            if mine and info.name in given:
                kw[info.name] = check_value(info, given.pop(info.name), style, command)
            elif info.default_for(command) != info.default:
                kw[info.name] = info.default_for(command)
        stages[stage] = construct(cls, kw, style)
    method = stages["method"].method
    if method == NO_ALIGNMENT:
        if given:
            info = next(o for o in matcher_options() if o.name in given)
            raise ConfigError(f"{info.label(style)} does not apply to method '{NO_ALIGNMENT}' (no alignment)")
        matcher = None
    else:
        matcher = make_matcher(PLEAS_MATCHER if method == PLEAS else method, given, style)
    if method != PLEAS:
        for info in options_of(PleasOptions, "pleas"):
            if getattr(stages["pleas"], info.name) != info.default:
                raise ConfigError(f"{info.label(style)} applies to --method pleas only")
    return Options(
        run=stages["run"],
        model=stages["model"],
        spec=stages["spec"],
        method=method,
        match=matcher,
        merge=stages["merge"],
        pleas=stages["pleas"],
        evaluate=stages["evaluate"],
        train=stages["train"],
        star=stages["star"],
        output=stages["output"],
        console=stages["console"],
    )
