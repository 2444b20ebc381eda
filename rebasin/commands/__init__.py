"""The command stories the command line and the Python API share, each a straight line over one
resolved run (``resolve``): ``pair`` (merge, barrier), ``barrier_map`` (the barriers of many),
``single`` (permute, spec, inspect), ``many`` (merge-many), ``batch`` (plans, on Ray with
``cluster``), ``train`` and ``demo``; the stages they are made of (``stages``), their input checks
(``inputs``), outputs (``writing``) and ``--dry-run`` (``dry_run``)."""

from rebasin.commands.barrier_map import barrier_map
from rebasin.commands.many import merge_many_checkpoints
from rebasin.commands.pair import barrier_checkpoints, merge_checkpoints
from rebasin.commands.single import describe_spec, inspect_checkpoint, permute_checkpoint
from rebasin.options import EvalOptions, MergeOptions, Options, build_options
from rebasin.report.document import gate, gate_value

__all__ = [
    "EvalOptions",
    "MergeOptions",
    "Options",
    "barrier_checkpoints",
    "barrier_map",
    "build_options",
    "describe_spec",
    "gate",
    "gate_value",
    "inspect_checkpoint",
    "merge_checkpoints",
    "merge_many_checkpoints",
    "permute_checkpoint",
]
