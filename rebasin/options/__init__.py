"""The typed options model: every option of every command, declared once.

Each stage of the flow has a frozen dataclass (run, model, spec, match, merge, evaluate, output);
each field is declared with :func:`option`, which records its command-line flag, help, bounds and
the commands that take it. The command line (``rebasin.cli``), batch plan keys (``rebasin.commands.batch``),
the options table in ``docs/options.md`` and the Python API all derive from these classes, and
every value is checked here, in :func:`check_value`, whoever supplies it.

Matching methods declare their own options on their registered matcher class
(``rebasin.matching.methods``); an option given for a method that does not use it is an error
naming the methods that do.

This module imports no torch: ``rebasin --help`` stays fast.
"""

from rebasin.core.fields import (
    Checked,
    OptionInfo,
    check_value,
    option,
    options_of,
    parse_json_object,
)
from rebasin.core.sizes import parse_size
from rebasin.options.build import (
    Options,
    all_options,
    build_options,
    for_command,
    make_matcher,
    matcher_options,
    plan_options,
)
from rebasin.options.docs import describe_defaults, options_table, write_options_doc
from rebasin.options.stages import (
    STAGES,
    EvalOptions,
    MergeOptions,
    ModelOptions,
    OutputOptions,
    RunOptions,
    SpecOptions,
)

__all__ = [
    "STAGES",
    "Checked",
    "EvalOptions",
    "MergeOptions",
    "ModelOptions",
    "OptionInfo",
    "Options",
    "OutputOptions",
    "RunOptions",
    "SpecOptions",
    "all_options",
    "build_options",
    "check_value",
    "describe_defaults",
    "for_command",
    "make_matcher",
    "matcher_options",
    "option",
    "options_of",
    "options_table",
    "parse_json_object",
    "parse_size",
    "plan_options",
    "write_options_doc",
]
