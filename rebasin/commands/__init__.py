"""The top-level stories used by the command line and the API, split by concern:
``checks`` (inputs), ``specs`` (spec resolution), ``evaluation`` (the model and data side),
``writing`` (outputs) and ``commands`` (one function per command)."""

from rebasin.commands.stories import (
    barrier_checkpoints,
    describe_spec,
    inspect_checkpoint,
    merge_checkpoints,
    merge_many_checkpoints,
    permute_checkpoint,
)
from rebasin.evaluate.setup import gate, gate_value
from rebasin.options import EvalOptions, MergeOptions, Options, build_options

__all__ = [
    "EvalOptions",
    "MergeOptions",
    "Options",
    "barrier_checkpoints",
    "build_options",
    "describe_spec",
    "gate",
    "gate_value",
    "inspect_checkpoint",
    "merge_checkpoints",
    "merge_many_checkpoints",
    "permute_checkpoint",
]
