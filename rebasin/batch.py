"""Plans of many merges and barriers (YAML), for scripted runs and CI gates.

```yaml
format_version: 1
defaults: {data: mnist1d, alphas: 11, max_barrier: 0.5}
items:
  - {name: mlp, a: a.safetensors, b: b.safetensors, output: merged.safetensors}
  - {name: mlp-naive, a: a.safetensors, b: b.safetensors, align: false}
```
Relative paths are taken from the plan's folder. Every problem of a plan is reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rebasin.errors import ConfigError, RebasinError
from rebasin.options import OptionInfo, Options, build_options, check_value, plan_options

ITEM_ONLY = {"name": str, "a": str, "b": str, "align": bool}
"""Keys of an item beyond the options model's plan options (``rebasin.options.plan_options``)."""
PATH_KEYS = ("a", "b", "output", "report", "save_permuted")


def item_keys() -> dict[str, OptionInfo | type]:
    """Every key an item may have: its own keys, ``method``, and the plan options."""
    return {**ITEM_ONLY, "method": str, **{o.name: o for o in plan_options()}}


def default_keys() -> set[str]:
    """Keys ``defaults`` may set (not the item's name, inputs or output paths)."""
    return set(item_keys()) - {"name", *PATH_KEYS}


@dataclass
class Plan:
    """A validated plan: its file and items (defaults applied, paths resolved)."""

    path: Path
    items: list[dict[str, Any]]


def _check(where: str, key: str, value: Any, problems: list[str]) -> None:
    want = item_keys()[key]
    if isinstance(want, OptionInfo):
        try:
            check_value(want, value, "plan")
        except ConfigError as e:
            problems.append(f"{where}: {e.message}")
        return
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if not ok:
        problems.append(f"{where}: '{key}' must be {want.__name__}, got {value!r}")


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan; raise ConfigError listing every problem."""
    import yaml

    p = Path(path)
    src = str(path)
    if not p.exists():
        raise ConfigError("no such file", source=src)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse plan ({str(e).splitlines()[0]})", source=src) from None
    problems: list[str] = []
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
    for k, v in defaults.items():
        if k not in default_keys():
            problems.append(f"defaults: unknown key '{k}'")
        else:
            _check("defaults", k, v, problems)
    items = data.get("items")
    if not isinstance(items, list) or not items:
        problems.append("'items' must be a non-empty list")
        items = []
    out = []
    names: set[str] = set()
    for i, item in enumerate(items):
        where = f"item {i + 1}"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        if isinstance(item.get("name"), str):
            where = f"item '{item['name']}'"
        before = len(problems)
        for k, v in item.items():
            if k not in item_keys():
                problems.append(f"{where}: unknown key '{k}'")
            else:
                _check(where, k, v, problems)
        for req in ("a", "b"):
            if req not in item:
                problems.append(f"{where}: missing '{req}'")
        merged = {**defaults, **item}
        merged.setdefault("name", f"item{i + 1}")
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
            try:
                item_options(merged)
            except ConfigError as e:
                problems.append(f"{where}: {e.message}")
        out.append(merged)
    if problems:
        raise ConfigError("; ".join(problems), source=src)
    return Plan(p, out)


def item_options(item: dict[str, Any]) -> Options:
    """The typed options of one item (the same model the command line builds)."""
    values = {k: v for k, v in item.items() if k not in ("name", "a", "b")}
    evaluate = "always" if "data" in item else "never"
    return build_options(values, "batch", style="plan", evaluate=evaluate)


def run_item(item: dict[str, Any]) -> dict[str, Any]:
    """Run one item (merge when it has an output, else barrier); return its summary row."""
    from rebasin.pipeline import barrier_checkpoints, gate_value, merge_checkpoints
    from rebasin.report import write_report

    opts = item_options(item)
    row: dict[str, Any] = {"name": item["name"], "a": item["a"], "b": item["b"]}
    if "output" in item:
        report = merge_checkpoints(item["a"], item["b"], item["output"], opts)
        row["outputs"] = [f for fs in report["output"]["files"].values() for f in fs]
    else:
        report = barrier_checkpoints(item["a"], item["b"], opts)
        row["outputs"] = []
    if "report" in item:
        write_report(report, item["report"])
        row["outputs"].append(item["report"])
    row["barrier"] = gate_value(report)
    row["max_barrier"] = item.get("max_barrier")
    gated = row["max_barrier"] is not None and row["barrier"] is not None
    row["status"] = "gate_failed" if gated and row["barrier"] > row["max_barrier"] else "ok"
    return row


def run_plan(plan: Plan, max_barrier: float | None = None) -> Iterator[dict[str, Any]]:
    """Run every item, continuing past failures; yield one summary row per item."""
    for item in plan.items:
        if max_barrier is not None and "max_barrier" not in item:
            item = {**item, "max_barrier": max_barrier}
        try:
            yield run_item(item)
        except RebasinError as e:
            yield {
                "name": item["name"],
                "a": item["a"],
                "b": item["b"],
                "status": "error",
                "error": e.line(),
                "barrier": None,
                "max_barrier": item.get("max_barrier"),
                "outputs": [],
            }


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
