"""The report: one versioned JSON document per run (schema 1)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rebasin._version import __version__
from rebasin.checkpoint import Checkpoint, StateDict
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
        "parameters": ck.num_parameters(),
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


def l2_distance(a: StateDict, b: StateDict) -> float:
    """Euclidean distance over every floating-point tensor of two state dicts."""
    total = 0.0
    for k in a:
        ta = a[k]
        if ta.is_floating_point():
            total += float(torch.sum((ta.double() - b[k].double()) ** 2))
    return math.sqrt(total)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(report: Mapping[str, Any]) -> str:
    """Serialize a report (non-finite floats become null)."""
    return json.dumps(_jsonable(report), indent=2) + "\n"


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a report as JSON, atomically."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".rebasin-", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(to_json(report))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
