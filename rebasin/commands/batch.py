"""Plans of many merges and barriers (YAML), for scripted runs and CI gates.

```yaml
format_version: 1
defaults: {data: mnist1d, alphas: 11, max_barrier: 0.5}
items:
  - {name: mlp, a: a.safetensors, b: b.safetensors, output: merged.safetensors}
  - {name: mlp-naive, a: a.safetensors, b: b.safetensors, method: none}
```
Relative paths are taken from the plan's folder. Every problem of a plan is reported at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rebasin.checkpoint.atomic import clean_stale
from rebasin.checkpoint.guard import Output, checkpoint_output, file_output, guard_outputs
from rebasin.commands.cluster import cancel_running
from rebasin.commands.pair import barrier_checkpoints, merge_checkpoints
from rebasin.commands.resolve import option_inputs
from rebasin.core.errors import ConfigError, RebasinError, error_line
from rebasin.core.textfiles import read_data
from rebasin.core.usercode import is_code_ref
from rebasin.options import OptionInfo, Options, build_options, check_value, plan_options
from rebasin.report.document import gate, gate_value

ITEM_ONLY = {"name": str, "a": str, "b": str}
"""Keys of an item beyond the options model's plan options (``rebasin.options.plan_options``)."""
PATH_KEYS = ("a", "b", "output", "report", "save_permuted")


def item_keys() -> dict[str, OptionInfo | type]:
    """Every key an item may have: its own keys and the plan options (``method`` among them)."""
    return {**ITEM_ONLY, **{o.name: o for o in plan_options()}}


def default_keys() -> set[str]:
    """Keys ``defaults`` may set (not the item's name, inputs or output paths)."""
    return set(item_keys()) - {"name", *PATH_KEYS}


@dataclass
class Plan:
    """A validated plan: its file and items (defaults applied, paths resolved)."""

    path: Path
    items: list[dict[str, Any]]


def _check(where: str, want: OptionInfo | type, key: str, value: Any, problems: list[str]) -> None:
    if isinstance(want, OptionInfo):
        try:
            check_value(want, value, "plan", "batch")
        except ConfigError as e:
            problems.append(f"{where}: {e.message}")
        return
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if not ok:
        problems.append(f"{where}: '{key}' must be {want.__name__}, got {value!r}")


CODE_KEYS = ("model", "data")
"""Plan keys whose value may name code to import (``MODULE:NAME``, ``file.py:NAME``)."""


def load_plan(path: str | os.PathLike[str], allow_code: bool = False) -> Plan:
    """Read and validate a plan; raise ConfigError listing every problem. Keys that name code to
    import are refused unless ``allow_code`` (``rebasin batch --allow-code``)."""

    p = Path(path)
    src = str(path)
    data = read_data(p, "plan")
    problems: list[str] = []
    keys = item_keys()  # once: the options are gathered anew on each call
    if not isinstance(data, dict):
        raise ConfigError("a plan must be a mapping with 'format_version' and 'items'", source=src)
    for k in data:
        if k not in ("format_version", "defaults", "items"):
            problems.append(f"unknown key '{k}' at top level")
    if data.get("format_version") != 1:
        problems.append("'format_version' must be 1")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append("'defaults' must be a mapping")
        defaults = {}
    allowed = default_keys()
    for k, v in defaults.items():
        if k not in allowed:
            problems.append(f"defaults: unknown key '{k}'")
        else:
            _check("defaults", keys[k], k, v, problems)
    items = data.get("items")
    if not isinstance(items, list) or not items:
        problems.append("'items' must be a non-empty list")
        items = []
    out = []
    names: set[str] = set()
    claimed: dict[Path, str] = {}
    checked: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(items):
        where = f"item {i + 1}"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        if isinstance(item.get("name"), str):
            where = f"item '{item['name']}'"
        before = len(problems)
        for k, v in item.items():
            if k == "align":
                problems.append(f"{where}: unknown key 'align' (use 'method: none' for the naive path only)")
            elif k not in keys:
                problems.append(f"{where}: unknown key '{k}'")
            else:
                _check(where, keys[k], k, v, problems)
        for req in ("a", "b"):
            if req not in item:
                problems.append(f"{where}: missing '{req}'")
        merged = {k: v for k, v in {**defaults, **item}.items() if v is not None}  # null: not given
        merged.setdefault("name", f"item{i + 1}")
        for k in CODE_KEYS:
            v = merged.get(k)
            if isinstance(v, str) and is_code_ref(v) and not allow_code:
                problems.append(f"{where}: '{k}' names code ('{v}'); pass --allow-code to import and run it")
        if merged["name"] in names:
            problems.append(f"{where}: duplicate name")
        names.add(merged["name"])
        for k in PATH_KEYS:
            if isinstance(merged.get(k), str):
                merged[k] = str((p.parent / merged[k]) if not os.path.isabs(merged[k]) else Path(merged[k]))
        for k in ("a", "b"):
            if isinstance(merged.get(k), str) and not Path(merged[k]).exists():
                problems.append(f"{where}: {k} file '{merged[k]}' does not exist")
        if "output" not in merged and "data" not in merged:
            problems.append(f"{where}: nothing to do (give 'output' to merge, 'data' to measure a barrier)")
        elif len(problems) == before:
            checked.append((where, merged))
        out.append(merged)
    inputs, valid = [p], []  # every file any item reads, the plan too: no item may write over one
    for where, item in checked:
        try:
            inputs += [Path(item["a"]), Path(item["b"]), *option_inputs(item_options(item))]
            valid.append((where, item))
        except RebasinError as e:
            problems.append(f"{where}: {e.line()}")
    for where, merged in valid:
        try:
            outputs = item_outputs(merged)
            guard_outputs(outputs, inputs, bool(merged.get("force")))
        except RebasinError as e:
            problems.append(f"{where}: {e.line()}")
        else:
            for o in outputs:
                key = o.path.resolve()
                if key in claimed:
                    other = claimed[key]
                    problems.append(f"{where}: {o.role} '{o.path}' is also written by item '{other}'")
                claimed[key] = merged["name"]
    if problems:
        shown = problems[:10] + ([f"and {len(problems) - 10} more problems"] if len(problems) > 10 else [])
        raise ConfigError("; ".join(shown), source=src)
    return Plan(p, out)


def item_outputs(item: dict[str, Any]) -> list[Output]:
    """The paths an item writes (checked by the output guard when the plan is loaded)."""
    out = [checkpoint_output(item["output"], "output")] if "output" in item else []
    if "save_permuted" in item:
        out.append(checkpoint_output(item["save_permuted"], "save_permuted"))
    if "report" in item:
        out.append(file_output(item["report"], "report"))
    return out


def item_options(item: dict[str, Any]) -> Options:
    """The typed options of one item (the same model the command line builds)."""
    values = {k: v for k, v in item.items() if k not in ITEM_ONLY}
    return build_options(values, "batch", style="plan")


def run_item(item: dict[str, Any]) -> dict[str, Any]:
    """Run one item (merge when it has an output, else barrier); return its summary row."""

    opts = item_options(item)
    row: dict[str, Any] = {"name": item["name"], "a": item["a"], "b": item["b"]}
    if "output" in item:
        report = merge_checkpoints(item["a"], item["b"], item["output"], opts)
    else:
        report = barrier_checkpoints(item["a"], item["b"], opts)
    row["outputs"] = [f for fs in report.get("output", {}).get("files", {}).values() for f in fs]
    row["barrier"] = gate_value(report)
    row["max_barrier"] = item.get("max_barrier")
    reason = gate(row["barrier"], row["max_barrier"])
    row["status"] = "ok" if reason is None else "gate_failed"
    if reason is not None:
        row["reason"] = reason
    return row


def plan_items(plan: Plan, max_barrier: float | None = None) -> list[dict[str, Any]]:
    """The items as they run: ``max_barrier`` (from the command line) where an item sets none."""
    if max_barrier is None:
        return list(plan.items)
    return [item if "max_barrier" in item else {**item, "max_barrier": max_barrier} for item in plan.items]


def error_row(item: dict[str, Any], e: BaseException) -> dict[str, Any]:
    """The summary row of an item that failed (an exception, user code's included, or a lost
    worker): the rest of the plan goes on."""
    return {
        "name": item["name"],
        "a": item["a"],
        "b": item["b"],
        "status": "error",
        "error": error_line(e),
        "barrier": None,
        "max_barrier": item.get("max_barrier"),
        "outputs": [],
    }


def try_item(item: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_item`, with a failure turned into the item's error row."""
    try:
        return run_item(item)
    except Exception as e:
        return error_row(item, e)


def run_plan(plan: Plan, max_barrier: float | None = None) -> Iterator[dict[str, Any]]:
    """Run every item, continuing past failures; yield one summary row per item."""
    for item in plan_items(plan, max_barrier):
        yield try_item(item)


def summarize(plan: Plan, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch summary document."""
    passed = sum(r["status"] == "ok" for r in rows)
    return {
        "schema": 1,
        "command": "batch",
        "plan": str(plan.path),
        "items": rows,
        "passed": passed,
        "failed": len(rows) - passed,
    }


# ------------------------------------------------------------------------------- on Ray


def _task_options(item: dict[str, Any]) -> dict[str, Any]:
    """The resources one batch item asks for: one CPU, and a GPU when its device is CUDA."""
    device = str(item.get("device") or "cpu")
    return {"num_cpus": 1, "num_gpus": 1 if device.startswith("cuda") else 0, "max_retries": 0}


def _absolute(item: dict[str, Any]) -> dict[str, Any]:
    """The item with its file paths absolute (a worker's folder is not the driver's)."""
    out = dict(item)
    for k in (*PATH_KEYS, "data", "spec"):
        v = out.get(k)
        if isinstance(v, str) and (k in PATH_KEYS or Path(v).exists()):
            out[k] = str(Path(v).resolve())
    return out


def run_items(ray: Any, items: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Run batch items as Ray tasks; yield each summary row as its task finishes. A task that
    raises or whose worker dies becomes that item's error row. Interrupted (Ctrl-C), the
    outstanding tasks are cancelled and their temporary files removed."""
    remote = ray.remote(try_item)
    pending: dict[Any, dict[str, Any]] = {}
    for item in items:
        item = _absolute(item)
        pending[remote.options(**_task_options(item)).remote(item)] = item
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(done[0])
            try:
                yield ray.get(done[0])
            except Exception as e:  # the worker died, or the task could not run
                yield error_row(item, e)
    finally:
        if pending:
            _cancel(ray, pending)


def _cancel(ray: Any, pending: dict[Any, dict[str, Any]]) -> None:
    """Cancel tasks still running and remove the temporary files they leave behind."""

    cancel_running(ray, list(pending))
    for ref in pending:
        with contextlib.suppress(Exception):
            ray.get(ref, timeout=30)
    for item in pending.values():
        for o in item_outputs(item):
            clean_stale(o.path.parent)
