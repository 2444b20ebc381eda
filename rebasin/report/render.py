"""Rendering for people: rich tables and progress on stderr. The only module that imports rich."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table as _RichTable


class _Plain(Console):
    """A console that prints text as written: no markup or emoji codes, control characters
    escaped, long lines capped."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(one_line(o) if isinstance(o, str) else o for o in objects), **kwargs)


class Table(_RichTable):
    """A rich table whose title and cells are shown as written (see :class:`_Plain`)."""

    def __init__(self, *args: Any, title: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, title=one_line(title) if title is not None else None, **kwargs)

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(one_line(c, 200) if isinstance(c, str) else c for c in cells), **kwargs)


err = _Plain(stderr=True, highlight=False, markup=False, emoji=False)
out = _Plain(highlight=False, markup=False, emoji=False)
"""Results people and pipes read (``inspect``, ``spec`` tables) go to stdout. Neither console
interprets markup or emoji codes: names, paths and metadata others wrote are shown as written
(tensor ``x[/bold]y`` stays ``x[/bold]y``), with control characters escaped (:func:`one_line`)."""

MAX_LINE = 2000
"""Longest message printed: longer ones keep their start and say how much was left out."""


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` on one line: control characters and line breaks (from file names, keys or
    messages others wrote) are shown escaped, and at most ``limit`` characters are kept."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    if len(shown) > limit:
        shown = f"{shown[:limit]}... ({len(shown) - limit} more characters)"
    return shown


def error(line: str, hint: str | None = None) -> None:
    """Print ``error: <line>`` (and ``hint: ...``) on stderr, plainly, one line each."""
    print(f"error: {one_line(line)}", file=sys.stderr)
    if hint:
        print(f"hint: {one_line(hint)}", file=sys.stderr)


def interactive() -> bool:
    """Whether progress bars make sense: stderr is a terminal and we are not in CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[str, float, float], None] | None]:
    """A progress callback drawing a rich bar on stderr, or None when disabled."""
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(desc: str, done: float, total: float) -> None:
            key = desc.split(" (")[0]
            if key not in tasks:
                tasks[key] = bar.add_task(desc, total=total)
            bar.update(tasks[key], description=desc, completed=done, total=total)

        yield update


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or x != x:  # none, or NaN: not measured
        return "-"
    return f"{x:.{digits}g}"


def merge_summary(report: Mapping[str, Any]) -> None:
    """Tables for a merge: inputs, groups (objective before/after, units moved), distances."""
    if "pleas" in report:
        pleas_summary(report)
        return
    m = report["match"]
    spec = report["spec"]
    t = Table(
        title=f"{m['method']} matching ({spec['source']}, {len(spec['groups'])} groups)",
        title_justify="left",
    )
    t.add_column("group")
    t.add_column("size", justify="right")
    t.add_column("objective before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("moved", justify="right")
    for g, s in m["groups"].items():
        t.add_row(
            g,
            str(s["size"]),
            _fmt(s["objective_before"]),
            _fmt(s["objective_after"]),
            f"{100 * s['moved_fraction']:.0f}%",
        )
    err.print(t)
    d = report["distance"]
    runs = ""
    if m["restarts"]:
        best = m["restarts"][m["best_restart"]]
        state = "converged" if best["converged"] else (m.get("stopped") or "max-iter reached")
        runs = f"{best['sweeps']} sweeps ({state}), {len(m['restarts'])} run(s), "
    name = m.get("objective_name") or "objective"
    better = {"max": "higher is better", "min": "lower is better"}.get(m.get("direction", ""), "")
    err.print(
        f"{name} {_fmt(m['objective_identity'])} -> {_fmt(m['objective'])}"
        f"{f' ({better})' if better else ''}; "
        f"L2 distance {_fmt(d['l2_before'])} -> {_fmt(d['l2_after'])}; "
        f"{runs}{report['timings']['match_s']:.2f}s",
        soft_wrap=True,
    )
    auto_choice(m)
    checked(report)
    moved = sum(1 for s in m["groups"].values() if s["moved_fraction"] > 0)
    frozen = spec.get("frozen") or []
    kept = f"; kept fixed by --freeze: {', '.join(frozen)}" if frozen else ""
    err.print(f"groups moved: {moved} of {len(m['groups'])}{kept}", soft_wrap=True)
    for note in spec.get("notes", []):
        err.print(f"note: {note}", soft_wrap=True)
    for kind, files in report["output"]["files"].items():
        err.print(f"wrote {kind}: {', '.join(files)}", soft_wrap=True)


def pleas_summary(report: Mapping[str, Any]) -> None:
    """Tables for a PLeaS merge: units merged and kept per group, the least-squares fit per
    layer, and each task's accuracy for A, B, the aligned average, the ensemble and PLeaS."""
    pl = report["pleas"]
    t = Table(title="PLeaS: units per group", title_justify="left")
    for col in ("group", "size", "width", "merged", "kept (each)", "merged size"):
        t.add_column(col, justify="left" if col == "group" else "right")
    for g, s in pl["groups"].items():
        sizes = (s["size"], s["merged"], s["kept"], s["merged_size"])
        t.add_row(g, str(sizes[0]), f"{s['width']:.3g}", *(str(v) for v in sizes[1:]))
    err.print(t)
    t = Table(title="least squares, layer by layer (relative residual)", title_justify="left")
    for col in ("layer", "rows", "placed average", "fitted"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for f in pl["layers"]:
        t.add_row(f["layer"], str(f["rows"]), _fmt(f["residual_before"]), _fmt(f["residual_after"]))
    err.print(t)
    if report.get("tasks"):
        names = ("a", "b", "average", "ensemble", "placed", "pleas")
        t = Table(title="test accuracy per task", title_justify="left")
        t.add_column("task")
        for n in names:
            t.add_column({"a": "A", "b": "B", "placed": "no l.sq."}.get(n, n), justify="right")
        for task, row in report["tasks"].items():
            t.add_row(task.upper() + "'s", *(f"{row[n]['acc']:.4f}" if n in row else "-" for n in names))
        err.print(t)
    params = pl["parameters"]
    ratio = params["merged"] / params["a"]
    err.print(
        f"parameters: A {params['a']}, merged {params['merged']} ({ratio:.2f}x; "
        f"{params['merged_nonzero']} nonzero: a unit kept from one model reads none of the other's)"
    )
    for kind, files in report["output"]["files"].items():
        err.print(f"wrote {kind}: {', '.join(files)}", soft_wrap=True)


def _member(m: Sequence[Any]) -> str:
    text = f"{m[0]}:{m[1]}"
    if len(m) > 2 and m[2] > 1:
        text += f"x{m[2]}"
    return text + (f"@{m[3]}" if len(m) > 3 else "")


def spec_summary(spec: Mapping[str, Any], fixed: Sequence[str]) -> None:
    """A table of groups and their members, then the tensors left fixed."""
    t = Table(title=f"spec ({spec['source']}), {len(spec['groups'])} groups", title_justify="left")
    t.add_column("group")
    t.add_column("size", justify="right")
    t.add_column("members (tensor:axis)")
    for g, body in spec["groups"].items():
        ms = body["members"]
        shown = ", ".join(_member(m) for m in ms[:4])
        more = f" ... ({len(ms)} in all)" if len(ms) > 4 else ""
        size = str(body["size"]) + (f" ({body['heads']} heads)" if "heads" in body else "")
        t.add_row(g, size, shown + more)
    out.print(t)
    for note in spec.get("notes", []):
        out.print(f"note: {note}", soft_wrap=True)
    shown = ", ".join(fixed[:8]) + (f" ... ({len(fixed)} in all)" if len(fixed) > 8 else "")
    out.print(f"left fixed: {shown or 'none'}", soft_wrap=True)
    out.print("(full member lists: rebasin spec CHECKPOINT -o spec.yaml, or --json)", soft_wrap=True)


def inspect_summary(info: Mapping[str, Any]) -> None:
    """Tensors with shapes and dtypes, totals, metadata."""
    inp = info["input"]
    t = Table(title=f"{inp['path']} ({inp['format']})", title_justify="left")
    t.add_column("tensor")
    t.add_column("shape")
    t.add_column("dtype")
    for row in info["tensors"]:
        t.add_row(row["name"], "(" + ", ".join(map(str, row["shape"])) + ")", row["dtype"])
    out.print(t)
    dtypes = ", ".join(f"{k}: {v}" for k, v in inp["dtypes"].items())
    fam = info.get("family")
    buffers = f", {inp['integer_elements']:,} integer buffer elements" if inp.get("integer_elements") else ""
    out.print(
        f"{inp['tensors']} tensors, {inp['parameters']:,} parameters{buffers} ({dtypes}); "
        f"architecture: {fam + ' (' + str(info['groups']) + ' groups)' if fam else 'not recognized'}"
    )
    if info["metadata"]:
        out.print("metadata:")
        for k, v in info["metadata"].items():
            out.print(f"  {k}: {v}", soft_wrap=True)


def permute_summary(report: Mapping[str, Any]) -> None:
    """One line per output."""
    spec, kept = report["spec"], report.get("kept", {})
    moved = sum(1 for g, f in report["moved_fraction"].items() if f > 0 and g not in kept)
    fixed = f" (kept fixed: {', '.join(kept)})" if kept else ""
    err.print(
        f"permuted {moved} of {len(spec['groups'])} groups{fixed} ({spec['source']}) with seed "
        f"{report['seed']}; wrote {', '.join(report['output']['files'])}",
        soft_wrap=True,
    )
    checked(report, "the permuted model", "the original")


def checked(report: Mapping[str, Any], what: str = "pi(B)", of: str = "B") -> None:
    """One line saying whether the written permutation was verified, and the report's notes."""
    eq = report.get("equivalence")
    if eq:
        if eq.get("ok") is None:
            err.print(eq.get("reason", "not verified"), soft_wrap=True)
        else:
            err.print(
                f"verified: {what} computes what {of} computes (max abs diff {eq['max_abs_diff']:.2g} "
                f"on {eq['probe']})",
                soft_wrap=True,
            )
    for note in report.get("notes", []):
        err.print(f"note: {note}", soft_wrap=True)


def auto_choice(match: Mapping[str, Any]) -> None:
    """What method auto tried and chose (nothing for other methods)."""
    o = match.get("options", {})
    if "candidates" not in o:
        if "auto" in o:  # no data: the reason for what it did
            err.print(f"method {match.get('method')}: {o['auto']}", soft_wrap=True)
        return
    tried = ", ".join(f"{c['method']} {c['score']:.4f} ({c['seconds']:.1f}s)" for c in o["candidates"])
    err.print(
        f"method {match.get('method')} chose {o['chosen']}; midpoint loss on training data: {tried}",
        soft_wrap=True,
    )
    if o.get("skipped"):
        err.print(f"skipped (over --budget {o['budget']:g}s): {', '.join(o['skipped'])}", soft_wrap=True)


def evaluation_summary(report: Mapping[str, Any]) -> None:
    """The barrier table: per path and split, both loss-barrier definitions, error barrier,
    midpoint accuracy; then the endpoints (nothing when the run measured no curves)."""
    if "evaluation" not in report:
        return
    ev = report["evaluation"]
    data = ev["data"]
    t = Table(
        title=f"linear mode connectivity: {ev['model']['name']} on {data['name']} "
        f"(BatchNorm: {ev['bn']}, {len(next(iter(ev['paths'].values()))['alphas'])} alphas)",
        title_justify="left",
    )
    for col, just in (
        ("path", "left"),
        ("split", "left"),
        ("loss barrier", "right"),
        ("(mean def.)", "right"),
        ("error barrier", "right"),
        ("midpoint acc", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for name, curve in ev["paths"].items():
        mid = min(range(len(curve["alphas"])), key=lambda i: abs(curve["alphas"][i] - 0.5))
        for split in ("train", "test"):
            b = curve["barriers"][split]
            style = "bold" if name == "aligned" else None
            t.add_row(
                name,
                split,
                f"{b['loss']['linear']:.4f}",
                f"{b['loss']['mean']:.4f}",
                f"{100 * b['error']['linear']:.1f}%",
                f"{100 * curve['acc'][split][mid]:.1f}%",
                style=style,
            )
    err.print(t)
    ends = ev["endpoints"]
    err.print(
        f"endpoints: A test acc {100 * ends['a']['test']['acc']:.1f}%, "
        f"B test acc {100 * ends['b']['test']['acc']:.1f}%",
        soft_wrap=True,
    )
    paths = ev["paths"]
    if "naive" in paths and "aligned" in paths:
        n = paths["naive"]["barriers"]["test"]["loss"]["linear"]
        a = paths["aligned"]["barriers"]["test"]["loss"]["linear"]
        if n > 0:
            err.print(f"aligned test loss barrier is {100 * a / n:.0f}% of the naive one", soft_wrap=True)
        worse = ev.get("aligned_worse_than_naive")
        if worse:
            err.print(
                f"warning: the aligned path is worse than the naive one on "
                f"{' and '.join(worse)} data: the alignment found does not help this pair "
                "(try --method auto with --data, or --method activation)",
                soft_wrap=True,
            )


def many_summary(report: Mapping[str, Any]) -> None:
    """Per-model movement and the distance to the mean."""
    r = report["merge_many"]
    t = Table(title=f"merge-many of {len(report['inputs'])} models", title_justify="left")
    t.add_column("model")
    t.add_column("units moved", justify="right")
    for inp, moved in zip(report["inputs"], r["moved_fraction"], strict=True):
        frac = sum(moved.values()) / max(1, len(moved))
        t.add_row(inp["path"], f"{100 * frac:.0f}%")
    err.print(t)
    err.print(
        f"total distance to the mean {_fmt(r['distance_before'])} -> {_fmt(r['distance_after'])} "
        f"in {r['rounds']} round(s); wrote {', '.join(report['output']['files'])}",
        soft_wrap=True,
    )
    checked(report, "every aligned model", "its original")


def wrote(paths: Sequence[Any]) -> None:
    """One line naming written files."""
    err.print("wrote " + ", ".join(str(p) for p in paths), soft_wrap=True)


def batch_summary(summary: Mapping[str, Any]) -> None:
    """One row per plan item: status, barrier, gate."""
    t = Table(title=f"batch: {summary['plan']}", title_justify="left")
    for col in ("item", "status", "test loss barrier", "gate", "detail"):
        t.add_column(col)
    for item in summary["items"]:
        b = item.get("barrier")
        t.add_row(
            item["name"],
            item["status"],
            "-" if b is None else f"{b:.4f}",
            "-" if item.get("max_barrier") is None else f"<= {item['max_barrier']}",
            item.get("error", "") or ", ".join(item.get("outputs", [])),
            style="red" if item["status"] != "ok" else None,
        )
    err.print(t)
    err.print(f"{summary['passed']} passed, {summary['failed']} failed", soft_wrap=True)


def barrier_summary(report: Mapping[str, Any]) -> None:
    """The barrier table, what auto chose, the verification, the files written."""
    evaluation_summary(report)
    if "match" in report:
        auto_choice(report["match"])
    checked(report)
    written = [f for fs in report.get("output", {}).get("files", {}).values() for f in fs]
    if written:
        wrote(written)


def map_summary(report: Mapping[str, Any]) -> None:
    """The pairwise map: the models numbered, the aligned (and naive) barrier matrices, the basins."""
    m = report["map"]
    names = m["models"]
    for k, name in enumerate(names):
        out.print(f"M{k + 1}  {one_line(name)}", soft_wrap=True)
    shown = (
        [("aligned", m["aligned"]), ("naive", m["naive"])]
        if m["aligned"] is not None
        else [("naive", m["naive"])]
    )
    for label, matrix in shown:
        ref = (
            f", in the coordinates of {one_line(m['reference'])}"
            if label == "aligned" and m["reference"]
            else ""
        )
        t = Table(title=f"{label}: {m['measure'].split(' (')[0]}{ref}", title_justify="left")
        t.add_column("")
        for k in range(len(names)):
            t.add_column(f"M{k + 1}", justify="right")
        for i, row in enumerate(matrix):
            t.add_row(f"M{i + 1}", *("-" if i == j else f"{v:.4f}" for j, v in enumerate(row)))
        out.print(t)
    groups = ", ".join("{" + " ".join(f"M{k + 1}" for k in g) + "}" for g in m["basins"])
    out.print(f"basins (barrier below {m['basin_threshold']}): {groups}", soft_wrap=True)
    written = [f for fs in report.get("output", {}).get("files", {}).values() for f in fs]
    if written:
        wrote(written)


def diagnosis_summary(report: Mapping[str, Any]) -> None:
    """Per weight tensor: the singular-direction agreement before and after alignment; per
    layer, the barrier it holds alone (with data); then the verification and the files."""
    d = report["diagnosis"]
    barriers = {x["layer"]: x.get("barrier") for x in d["layers"]}
    t = Table(
        title=f"top-{d['k']} singular directions of A and pi(B) (1 = same subspaces)", title_justify="left"
    )
    for col, just in (
        ("tensor", "left"),
        ("before", "right"),
        ("after", "right"),
        ("layer barrier", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    shown: set[str] = set()
    for r in d["tensors"]:
        b = barriers.get(r["layer"])
        cell = "" if b is None or r["layer"] in shown else f"{b:.4f}"
        shown.add(r["layer"])
        t.add_row(
            one_line(r["tensor"]), f"{r['before']['agreement']:.3f}", f"{r['after']['agreement']:.3f}", cell
        )
    out.print(t)
    checked(report)
    written = [f for fs in report.get("output", {}).get("files", {}).values() for f in fs]
    if written:
        wrote(written)


def star_summary(report: Mapping[str, Any]) -> None:
    """The star model's barriers to the sources and held-out models beside the sources' pairwise
    ones; the model average, when measured; the files."""
    b = report["barriers"]
    st = report["star"]
    t = Table(title=f"star model after {st['steps']} steps: {b['measure']}", title_justify="left")
    for col, just in (("path", "left"), ("naive", "right"), ("aligned", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in b["star_to_sources"]:
        t.add_row(f"star -> {one_line(r['model'])} (source)", f"{r['naive']:.4f}", f"{r['aligned']:.4f}")
    for r in b["star_to_held_out"]:
        t.add_row(f"star -> {one_line(r['model'])} (held out)", f"{r['naive']:.4f}", f"{r['aligned']:.4f}")
    for r in b["between_sources"]:
        t.add_row(f"{one_line(r['a'])} -> {one_line(r['b'])}", f"{r['naive']:.4f}", f"{r['aligned']:.4f}")
    out.print(t)
    means = b["mean_aligned"]
    parts = [f"{k.replace('_', ' ')} {v:.4f}" for k, v in means.items() if v is not None]
    out.print("mean aligned barrier: " + ", ".join(parts), soft_wrap=True)
    if "average" in report:
        a = report["average"]
        for key, label in (
            ("star_domain_average", f"star-domain average of {a['points']} points"),
            ("sources_ensemble", "ensemble of the sources"),
            ("star_model", "star model alone"),
        ):
            m = a[key]
            out.print(
                f"{label}: test acc {100 * m['acc']:.1f}%, ECE {m['ece']:.4f}, NLL {m['nll']:.4f}",
                soft_wrap=True,
            )
    written = [f for fs in report.get("output", {}).get("files", {}).values() for f in fs]
    if written:
        wrote(written)


def train_summary(report: Mapping[str, Any]) -> None:
    """One line: what was trained, how well, where it went."""
    m, t = report["metrics"], report["train"]
    err.print(
        f"trained {report['model']['name']} on {report['data']['name']} (seed {report['seed']}, "
        f"{t['epochs']} epochs): train acc {100 * m['train']['acc']:.1f}%, "
        f"test acc {100 * m['test']['acc']:.1f}%; wrote {', '.join(report['output']['files'])}",
        soft_wrap=True,
    )


def dry_run_summary(plan: Mapping[str, Any]) -> None:
    """The resolved run, one line per decision, then the estimates; nothing was written."""
    runs = plan["items"] if plan.get("command") == "batch" else [plan]
    for run in runs:
        if "name" in run:
            err.print(f"item '{run['name']}':")
        for key, label in DRY_RUN_LINES:
            value = run.get(key)
            if value:
                err.print(f"  {label}: {value}", soft_wrap=True)
        est = run.get("estimate")
        if est:
            err.print(
                f"  estimate: about {_seconds(est['seconds'])}, "
                f"peak memory about {_bytes(est['peak_bytes'])} ({est['basis']})",
                soft_wrap=True,
            )
        for o in run.get("outputs", []):
            err.print(f"  output ({o['role']}): {o['path']}", soft_wrap=True)
    err.print("dry run: every check before matching passed; nothing was written")


DRY_RUN_LINES = (
    ("inputs_text", "inputs"),
    ("model_text", "model"),
    ("spec_text", "spec"),
    ("method_text", "method"),
    ("data", "data"),
    ("evaluation", "evaluation"),
    ("verification", "verification"),
    ("not_checked", "not checked in a dry run"),
)


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"
