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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rebasin.errors import ConfigError, RebasinError

ITEM_KEYS = {
    "name": str,
    "a": str,
    "b": str,
    "output": str,
    "report": str,
    "save_permuted": str,
    "method": str,
    "spec": str,
    "alpha": float,
    "seed": int,
    "restarts": int,
    "max_iter": int,
    "data": str,
    "model": str,
    "model_args": dict,
    "alphas": int,
    "bn": str,
    "align": bool,
    "max_barrier": float,
    "force": bool,
    "max_train": int,
    "device": str,
    "cost": str,
    "steps": int,
    "epochs": int,
    "lr": float,
    "estimator": str,
    "freeze": list,
}
DEFAULT_KEYS = set(ITEM_KEYS) - {"name", "a", "b", "output", "report", "save_permuted"}
PATH_KEYS = ("a", "b", "output", "report", "save_permuted")


@dataclass
class Plan:
    """A validated plan: its file and items (defaults applied, paths resolved)."""

    path: Path
    items: list[dict[str, Any]]


def _check_type(where: str, key: str, value: Any, problems: list[str]) -> None:
    want = ITEM_KEYS[key]
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
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
        if k not in DEFAULT_KEYS:
            problems.append(f"defaults: unknown key '{k}'")
        else:
            _check_type("defaults", k, v, problems)
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
        for k, v in item.items():
            if k not in ITEM_KEYS:
                problems.append(f"{where}: unknown key '{k}'")
            else:
                _check_type(where, k, v, problems)
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
        out.append(merged)
    if problems:
        raise ConfigError("; ".join(problems), source=src)
    return Plan(p, out)


def run_item(item: dict[str, Any]) -> dict[str, Any]:
    """Run one item (merge when it has an output, else barrier); return its summary row."""
    from rebasin.pipeline import EvalOptions, MergeOptions, barrier_checkpoints, gate_value, merge_checkpoints
    from rebasin.report import write_report

    opts = MergeOptions(
        method=item.get("method", "weight"),
        alpha=float(item.get("alpha", 0.5)),
        spec=item.get("spec", "auto"),
        seed=item.get("seed", 0),
        restarts=item.get("restarts", 1),
        max_iter=item.get("max_iter", 100),
        device=item.get("device", "cpu"),
        force=item.get("force", False),
        save_permuted=item.get("save_permuted"),
        cost=item.get("cost", "l2"),
        steps=item.get("steps"),
        epochs=item.get("epochs"),
        lr=item.get("lr"),
        estimator=item.get("estimator", "st"),
        freeze=[str(f) for f in item.get("freeze", [])],
        model=item.get("model"),
        model_args=item.get("model_args"),
    )
    ev = None
    if "data" in item:
        ev = EvalOptions(
            data=item["data"],
            model=item.get("model"),
            model_args=item.get("model_args"),
            alphas=item.get("alphas", 25),
            bn=item.get("bn", "auto"),
            max_train=item.get("max_train"),
            device=item.get("device", "cpu"),
        )
    row: dict[str, Any] = {"name": item["name"], "a": item["a"], "b": item["b"]}
    if "output" in item:
        report = merge_checkpoints(item["a"], item["b"], item["output"], opts, None, ev)
        row["outputs"] = [f for fs in report["output"]["files"].values() for f in fs]
    else:
        report = barrier_checkpoints(item["a"], item["b"], opts, ev, align=item.get("align", True))
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


Callback = Callable[[dict[str, Any]], None]
