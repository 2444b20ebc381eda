"""The report: one versioned JSON document per run (schema 1)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rebasin._version import __version__
from rebasin.checkpoint import Checkpoint
from rebasin.spec.core import PermutationSpec

SCHEMA = 1


def new_report(command: str) -> dict[str, Any]:
    """An empty report for ``command``."""
    return {"schema": SCHEMA, "rebasin_version": __version__, "command": command}


def input_info(ck: Checkpoint, with_hash: bool = True) -> dict[str, Any]:
    """Path, hash, size and dtypes of a checkpoint."""
    info: dict[str, Any] = {"path": str(ck.path), "format": ck.format}
    if with_hash:
        info["sha256"] = ck.sha256()
    info |= {
        "tensors": len(ck.shapes),
        "parameters": ck.num_parameters(floating=True),
        "integer_elements": ck.num_parameters(floating=False),
        "dtypes": ck.dtype_counts(),
    }
    return info


def spec_info(spec: PermutationSpec, source: str, names: Sequence[str]) -> dict[str, Any]:
    """The spec as the report shows it: source, groups with sizes and members, fixed tensors."""
    return {
        "source": source,
        "family": spec.family,
        "digest": spec.digest(),
        "groups": spec.to_dict()["groups"],
        "fixed": spec.fixed(names),
        "notes": list(spec.notes),
    }


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON can hold it (non-finite floats become null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(report: Mapping[str, Any]) -> str:
    """Serialize a report (non-finite floats become null)."""
    return json.dumps(jsonable(report), indent=2) + "\n"


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a report as JSON, atomically."""
    from rebasin.checkpoint.atomic import write_bytes

    write_bytes(path, to_json(report).encode())
