"""Every option of every command, and turning flat values (command line, plan item) into Options."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rebasin.core.errors import ConfigError
from rebasin.core.fields import OptionInfo, check_value, options_of
from rebasin.options.stages import (
    STAGES,
    EvalOptions,
    MergeOptions,
    ModelOptions,
    OutputOptions,
    RunOptions,
    SpecOptions,
)


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
        """The matcher to run (the default method when none was configured)."""
        if self.match is not None:
            return self.match
        from rebasin.matching.registry import DEFAULT_METHOD, MATCHERS

        return MATCHERS.get(DEFAULT_METHOD)()


def build_options(
    values: Mapping[str, Any], command: str, style: str = "cli", evaluate: str = "auto"
) -> Options:
    """Turn flat ``values`` (option name -> value; absent or None means the default) into checked
    :class:`Options`. ``method`` picks the matcher; its own options may only be given for it.
    ``evaluate``: ``auto`` (evaluate when data, a model, a BatchNorm fix or a gate asks for it),
    ``always`` or ``never``. Raises ConfigError naming the first bad option."""
    from rebasin.matching.registry import DEFAULT_METHOD, MATCHERS

    given = {k: v for k, v in values.items() if v is not None and v != ()}
    known = {o.name: o for o in all_options()} | {"method": None, "align": None}
    for k in given:
        if k not in known:
            raise ConfigError(f"unknown option '{k}'")
    method = given.pop("method", DEFAULT_METHOD)
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
