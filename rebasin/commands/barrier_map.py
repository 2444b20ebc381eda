"""``rebasin barrier M1 M2 ... Mn``: the pairwise map of naive and aligned loss barriers.

By default every pair is measured as ``rebasin barrier Mi Mj`` measures it (the later model
aligned to the earlier), so each entry equals that separate run. With ``--reference M`` every
model is aligned once to M, and each pair's aligned path runs between the two aligned models, in
M's coordinates. Models whose aligned barrier is below ``--basin-threshold`` are joined into one
basin (connected components). With ``--ray``, the pairs run as Ray tasks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rebasin.commands.cluster import connect
from rebasin.commands.pair import barrier_checkpoints
from rebasin.commands.resolve import resolve_run
from rebasin.commands.stages import Timings, align, curves, evaluator, finish_with_plot, run_spec
from rebasin.core.errors import ConfigError
from rebasin.core.types import PathLike, Progress
from rebasin.options import Options
from rebasin.permutation import permute
from rebasin.report.document import input_info, new_report
from rebasin.report.plot import plot_map
from rebasin.verify.worker import Check

SPLIT = "test"
"""The split whose loss barrier (linear definition) fills the map."""


def barrier_map(
    paths: Sequence[PathLike], options: Options, progress: Progress | None = None
) -> dict[str, Any]:
    """The report of the pairwise map: ``map`` (models, naive and aligned matrices, basins) and
    ``pairs`` (one row per pair); the heatmap with ``--plot``."""
    opts = options
    if len(paths) < 3:
        raise ConfigError("the pairwise map takes three or more models (two: the plain barrier)")
    names = [str(p) for p in paths]
    if len(set(names)) != len(names):
        raise ConfigError("a model is named twice", "give each checkpoint once")
    ref = opts.evaluate.reference
    timings = Timings()
    extra = [ref] if ref is not None and ref not in names else []
    run = resolve_run("barrier", opts, [*paths, *extra])  # outputs checked, every model loaded
    if run.evaluation is None:
        raise ConfigError("the pairwise map needs data to measure barriers on", "pass --data")
    if ref is not None and run.matcher is None:
        raise ConfigError("--reference aligns models: it takes a method other than none")
    n = len(paths)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if ref is not None:
        rows = _in_reference(run, names, ref, pairs, progress)
    elif opts.run.ray is not None:
        rows = _on_ray(names, opts, pairs)
    else:
        rows = [_pair(names[i], names[j], _pair_options(opts), progress) | {"i": i, "j": j} for i, j in pairs]
    naive = [[0.0] * n for _ in range(n)]
    aligned: list[list[float]] | None = [[0.0] * n for _ in range(n)] if run.matcher is not None else None
    for r in rows:
        i, j = r["i"], r["j"]
        naive[i][j] = naive[j][i] = r["naive"]
        if aligned is not None:
            aligned[i][j] = aligned[j][i] = r["aligned"]
    threshold = opts.evaluate.basin_threshold
    report = new_report("barrier")
    report["inputs"] = {"models": [input_info(ck) for ck in run.checkpoints[:n]]}
    report["method"] = {"name": run.matcher.name if run.matcher is not None else "none"}
    report["map"] = {
        "models": names,
        "measure": f"{SPLIT} loss barrier (linear definition)",
        "reference": ref,
        "naive": naive,
        "aligned": aligned,
        "basin_threshold": threshold,
        "basins": basins(aligned if aligned is not None else naive, threshold),
    }
    report["pairs"] = sorted(rows, key=lambda r: (r["i"], r["j"]))
    report["timings"] = timings.total()
    return finish_with_plot(report, run, lambda path: plot_map(report["map"], path))


def basins(matrix: Sequence[Sequence[float]], threshold: float) -> list[list[int]]:
    """Groups of models joined by a barrier below ``threshold`` (connected components, each
    sorted, in the order of their first model)."""
    n = len(matrix)
    parent = list(range(n))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i in range(n):
        for j in range(i + 1, n):
            if matrix[i][j] < threshold:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for k in range(n):
        groups.setdefault(root(k), []).append(k)
    return sorted(groups.values(), key=lambda g: g[0])


def _pair_options(opts: Options) -> Options:
    """The options of one pair's run: no report, plot, gate or Ray of its own."""
    return dataclasses.replace(
        opts,
        output=dataclasses.replace(opts.output, report=None, plot=None),
        evaluate=dataclasses.replace(opts.evaluate, max_barrier=None, reference=None),
        run=dataclasses.replace(opts.run, ray=None),
    )


def _pair(a: str, b: str, opts: Options, progress: Progress | None = None) -> dict[str, Any]:
    """One pair measured as ``rebasin barrier A B`` measures it: its row of the map."""
    rep = barrier_checkpoints(a, b, opts, progress)
    paths = rep["evaluation"]["paths"]
    row: dict[str, Any] = {"a": a, "b": b, "naive": _barrier(paths["naive"])}
    if "aligned" in paths:
        row["aligned"] = _barrier(paths["aligned"])
        row["method"] = rep["method"]["name"]
        row["verified"] = rep.get("equivalence", {}).get("ok")
    return row


def _barrier(curve: dict[str, Any]) -> float:
    return float(curve["barriers"][SPLIT]["loss"]["linear"])


def _on_ray(names: list[str], opts: Options, pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """The pairs as Ray tasks (absolute paths: a task may run in another folder)."""
    assert opts.run.ray is not None
    ray = connect(opts.run.ray)
    task = ray.remote(_pair)
    pair_opts = _pair_options(opts)
    absolute = [str(Path(p).resolve()) for p in names]
    refs = {task.remote(absolute[i], absolute[j], pair_opts): (i, j) for i, j in pairs}
    rows = []
    for ref, (i, j) in refs.items():
        rows.append(ray.get(ref) | {"i": i, "j": j, "a": names[i], "b": names[j]})
    return rows


def _in_reference(
    run: Any, names: list[str], ref: str, pairs: list[tuple[int, int]], progress: Progress | None
) -> list[dict[str, Any]]:
    """Every model aligned once to ``ref``; each pair's aligned path runs between the aligned
    models, its naive path between the models as they are."""
    cks = list(run.checkpoints)
    r = names.index(ref) if ref in names else len(names)
    ref_ck = cks[r]
    spec, _, _, _, _ = run_spec(run)
    ev = evaluator(dataclasses.replace(run, checkpoints=(ref_ck, *cks[:r], *cks[r + 1 :])))
    aligned_states: list[Any] = []
    status: list[bool | None] = []
    for k, ck in enumerate(cks[: len(names)]):
        if k == r:
            aligned_states.append(ck.state)
            status.append(True)
            continue
        pair_run = dataclasses.replace(run, checkpoints=(ref_ck, ck))
        with Check(run.verification, run.seed, spec, [(ck, "pi(B)", "B")]) as check:
            result = align(pair_run, spec, ev, progress)
            status.append(check(result.perm).get("ok"))
        aligned_states.append(permute(ck.state, spec, result.perm))
    rows = []
    for i, j in pairs:
        pair_run = dataclasses.replace(run, checkpoints=(cks[i], cks[j]))
        naive = curves(pair_run, ev, cks[i].state, cks[j].state, None, progress)["paths"]["naive"]
        both = curves(pair_run, ev, aligned_states[i], aligned_states[j], None, progress)["paths"]["naive"]
        rows.append(
            {
                "i": i,
                "j": j,
                "a": names[i],
                "b": names[j],
                "naive": _barrier(naive),
                "aligned": _barrier(both),
                "method": run.matcher.name,
                "verified": status[i] is not False and status[j] is not False,
            }
        )
    return rows
