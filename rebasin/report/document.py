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
from rebasin.checkpoint.atomic import write_bytes
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

    write_bytes(path, to_json(report).encode())


def evaluation_report(ev: Any, curves: Mapping[str, Any]) -> dict[str, Any]:
    """The report's ``evaluation`` section: model, data, BatchNorm mode, curves, endpoints."""
    out: dict[str, Any] = {
        "model": {"name": ev.model_name, "args": ev.model_args},
        "data": ev.data.describe() | ({"max_train": ev.max_train} if ev.max_train else {}),
        "bn": ev.bn,
        "paths": {name: c.to_dict() for name, c in curves.items()},
    }
    first = next(iter(curves.values()))
    out["endpoints"] = {
        "a": {s: {"loss": first.loss[s][0], "acc": first.acc[s][0]} for s in first.loss},
        "b": {s: {"loss": first.loss[s][-1], "acc": first.acc[s][-1]} for s in first.loss},
    }
    if "naive" in out["paths"] and "aligned" in out["paths"]:
        out["aligned_worse_than_naive"] = worse_splits(out["paths"])
    return out


def worse_splits(paths: Mapping[str, Any]) -> list[str]:
    """The splits on which the aligned path's loss barrier (linear definition) is above the
    naive path's: alignment made things worse there."""
    naive, aligned = paths["naive"]["barriers"], paths["aligned"]["barriers"]
    return [s for s in aligned if aligned[s]["loss"]["linear"] > naive[s]["loss"]["linear"]]


def gate_value(report: Mapping[str, Any]) -> float | None:
    """The number ``--max-barrier`` is compared with: the test loss barrier (linear definition)
    of the aligned path (of the naive path when nothing was aligned); for the pairwise map, the
    largest of its pairs'."""
    if "map" in report:  # the pairwise map: its largest barrier
        m = report["map"]
        matrix = m["aligned"] if m["aligned"] is not None else m["naive"]
        return max(float(v) for row in matrix for v in row)
    ev = report.get("evaluation")
    if not ev:
        return None
    path = "aligned" if "aligned" in ev["paths"] else "naive"
    return float(ev["paths"][path]["barriers"]["test"]["loss"]["linear"])


def gate(value: float | None, limit: float | None) -> str | None:
    """Why ``value`` fails the ``--max-barrier`` gate ``limit`` (None when it passes or no gate
    is set). A barrier that is not a finite number always fails a gate."""
    if limit is None:
        return None
    if value is None:
        return "no barrier was measured"
    if not math.isfinite(value):
        return f"test loss barrier is {value} (the path's loss is not finite)"
    if value > limit:
        return f"test loss barrier {value:.4f} > --max-barrier {limit}"
    return None
