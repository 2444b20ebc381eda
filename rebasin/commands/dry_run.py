"""``--dry-run``: resolve a run from headers only, make every check the real run makes before
matching that needs no tensor data, and say what would happen: what is matched with which method
and options, which groups, what is evaluated on which data, how the writes are verified, every
output path, and the estimated time and peak memory. Nothing is written.

The estimates come from the shapes and a few measurements taken here (matmul and assignment
rates, measured in a fraction of a second): reading the pair, the products of the expected
sweeps of weight matching (or the operations a data-driven method's own estimate counts), the
assignments, the evaluation's forward passes and the write; peak memory from the largest tensors
held at once, the largest cost matrix and the models built for evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import torch

from rebasin.checkpoint.state import shape_of
from rebasin.commands.batch import item_options, load_plan
from rebasin.commands.resolve import Run, describe, resolve_run
from rebasin.commands.stages import check_unaligned, run_spec
from rebasin.core.errors import ConfigError, RebasinError
from rebasin.core.types import PathLike
from rebasin.data import load_data
from rebasin.evaluate.setup import check_evaluation
from rebasin.matching.assignment import (
    AUCTION,
    PROCESSES,
    assignment_bytes,
    plan_concurrency,
    solve_assignment,
)
from rebasin.matching.auto import NOMINAL_FLOPS
from rebasin.matching.costs import WRITES_AHEAD, CostModel, exact_half_products, sweep_products
from rebasin.matching.methods import EXPECTED_SWEEPS
from rebasin.matching.weight import AHEAD
from rebasin.options import Options
from rebasin.options.build import PLEAS
from rebasin.spec.core import PermutationSpec

NOT_CHECKED = "that every weight is finite (it needs the tensor data; the real run reads it first)"

BASE_BYTES = 400 << 20
"""Resident memory of the process before any checkpoint is read (Python, torch, numpy)."""
HF_BYTES = 500 << 20
"""More when transformers is imported (Hugging Face models)."""
READ_BYTES_PER_S = 500e6
"""Assumed rate of reading checkpoints (a cold disk is slower, the page cache faster)."""
WRITE_BYTES_PER_S = 300e6
START_S = 3.0
"""Process start, imports, spec inference."""


def dry_run(command: str, opts: Options, paths: Sequence[PathLike]) -> dict[str, Any]:
    """The dry run of ``command`` (``batch``: of every item of the plan ``paths[0]``)."""
    if command == "batch":
        return _batch(paths[0], opts)
    out = opts.output.output
    return plan_run(resolve_run(command, opts, paths, out))


def plan_run(run: Run) -> dict[str, Any]:
    """The resolved run with its spec, its pre-matching checks made, and its estimates."""
    a = run.checkpoints[0]
    spec = None
    if run.command in ("merge", "permute", "merge-many") or run.matcher is not None:
        spec, source, frozen, _, _ = run_spec(run, check_data=False)
    else:
        check_unaligned(run, check_data=False)
        source, frozen = "", []
    if run.data is not None:
        check_evaluation(a, run.model.need(), run.data, run.seed)
    out = describe(run)
    out["inputs_text"] = ", ".join(f"{c.path} ({_size(c)})" for c in run.checkpoints)
    out["model_text"] = f"{run.model.ref.name} (from {run.model.source})" if run.model.ref else "none"
    if spec is not None:
        moved = ", ".join(list(spec.sizes)[:6]) + (
            f" ... ({len(spec.sizes)} in all)" if len(spec.sizes) > 6 else ""
        )
        out["spec"] = {"source": source, "groups": dict(spec.sizes), "frozen": frozen}
        out["spec_text"] = f"{source}, {len(spec.sizes)} groups ({moved})" + (
            f"; frozen: {', '.join(frozen)}" if frozen else ""
        )
    if run.matcher is not None:
        data = " with the models run on the training data" if run.matcher_data else ""
        shown = {k: v for k, v in run.matcher.to_dict().items() if v is not None}
        out["method_text"] = f"{run.matcher.describe()}{data}; options {shown}"
    elif run.command == "barrier":
        out["method_text"] = "none: the naive path only"
    if run.options.method == PLEAS:
        p = run.options.pleas
        width = f"budget {p.budget_params} parameters" if p.budget_params else f"width {p.width or 1.5}"
        out["method"] = "pleas"
        out["method_text"] = (
            f"pleas at {width}: units matched by activation correlations, the best-correlated "
            "merged, then least squares layer by layer"
        )
        out["evaluation"] = "each task's test accuracy: A, B, average, ensemble, PLeaS"
        out["verification"] = "none: a PLeaS merge is a new model, not a permutation of B"
    out["not_checked"] = NOT_CHECKED
    out["estimate"] = estimate(run, spec)
    return out


def _batch(plan_path: PathLike, opts: Options) -> dict[str, Any]:
    """Every item resolved and checked as its own dry run; one error naming each item that
    would fail before matching."""

    plan = load_plan(plan_path, opts.run.allow_code)
    items, problems = [], []
    for item in plan.items:
        try:
            o = item_options(item)
            command = "merge" if "output" in item else "barrier"
            run = resolve_run(command, o, [item["a"], item["b"]], item.get("output"))
            items.append({"name": item["name"], **plan_run(run)})
        except RebasinError as e:
            problems.append(f"item '{item['name']}': {e.line()}")
    if problems:
        raise ConfigError("; ".join(problems), source=str(plan_path))
    return {"command": "batch", "plan": str(plan_path), "items": items}


def _size(ck: Any) -> str:
    n = _bytes(ck)
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def _itemsize(dtype: Any) -> int:

    return int(torch.empty((), dtype=dtype).element_size())


def _bytes(ck: Any) -> int:
    return sum(math.prod(s) * _itemsize(ck.dtypes[k]) for k, s in ck.shapes.items())


@cache
def matmul_rate(half: bool = False) -> float:
    """Floating-point operations per second of a float32 matmul here (measured once); with
    ``half``, of one whose operands are bfloat16 values, at the rate weight matching's products
    of bfloat16 weights run (:func:`exact_half_products`: the bfloat16 units where the CPU has
    them, else the same as float32)."""

    x = torch.randn(768, 768)
    if half:
        x = x.bfloat16().float()
    with exact_half_products(torch.bfloat16 if half else x.dtype, x.device):
        torch.mm(x, x)
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < 0.15:
            torch.mm(x, x)
            n += 1
        return 2 * 768**3 * n / (time.perf_counter() - t)


def nominal_rate(device: str) -> float:
    """The throughput data-driven methods reach (many small operations, far below a large
    matmul's): the rate ``auto`` budgets them with."""
    return NOMINAL_FLOPS["cuda" if device.startswith("cuda") else "cpu"]


def assignment_seconds(n: int, backend: str = "auto", device: str = "cpu") -> float:
    """Seconds of one n x n linear assignment on weakly structured costs (measured once at
    :data:`ASSIGNMENT_N`, on ``device`` for the auction, scaled as n^2.5)."""
    where = device if backend == AUCTION else "cpu"  # the others solve here whatever the device
    return _assignment_base(backend, where) * (n / ASSIGNMENT_N) ** 2.5


ASSIGNMENT_N = 1024
"""Size at which the dry run times an assignment (about 15 ms with LAPJV). Scaled as n^2.5 from
there, LAPJV's measured 0.095 s at 2048 and 1.07 s at 5632 come out 0.08 and 0.96 s; from 256,
as before, 0.16 and 2.0 s (below 1024 the solve is too short to scale from)."""


@cache
def _assignment_base(backend: str, device: str) -> float:
    c = np.random.default_rng(0).standard_normal((ASSIGNMENT_N, ASSIGNMENT_N)).astype(np.float32)
    solve_assignment(c[:64, :64], backend, device=device)  # the back-end's first call, off the clock
    t = time.perf_counter()
    solve_assignment(c, backend, device=device)
    return time.perf_counter() - t


def estimate(run: Run, spec: PermutationSpec | None) -> dict[str, Any]:
    """Estimated wall time (seconds) and peak resident memory (bytes) of the real run."""

    cks = run.checkpoints
    pair_bytes = sum(_bytes(c) for c in cks)
    largest = max((math.prod(s) for c in cks for s in c.shapes.values()), default=0)
    hf = run.model.ref is not None and run.model.ref.config is not None
    seconds = START_S + 2 * pair_bytes / READ_BYTES_PER_S  # the scan, and the reads of the write pass
    half = False  # products of bfloat16 weights on the CPU, at its bfloat16 rate
    workers = 1  # assignments solved at once
    sweeps = 0.0  # of weight matching's products, in all
    peak = BASE_BYTES + 4 * 4 * largest  # float32 copies of a few tensors (the check runs apart)
    if spec is not None and run.command != "permute":
        weighed = spec.cost_params()
        sweep = sweep_products(spec, {k: shape_of(cks[0].state, k) for k in weighed}, weighed)
        half = run.device == "cpu" and all(c.dtypes[k] == torch.bfloat16 for c in cks for k in weighed)
        n_max = max(spec.sizes.values())
        asked = getattr(run.matcher, "assign_workers", 0)
        workers, backend = plan_concurrency(
            asked, run.matcher.backend if run.matcher else "auto", n_max, run.device == "cpu"
        )
        solver = "lap" if backend == PROCESSES else backend  # LAPJV there as here
        laps = sum(assignment_seconds(n, solver, run.device) for n in spec.sizes.values()) / workers
        # the largest assignments, solved at once, and kept costs waiting to be written to
        # scratch files (float32)
        peak += workers * assignment_bytes(n_max, workers > 1) + WRITES_AHEAD * 4 * n_max * n_max
        if run.matcher is not None:
            # units' tensors held from their products to their solves
            model = CostModel(cks[0].state, cks[0].state, spec, torch.device("cpu"), scratch=False)
            peak += model.held_bytes(workers + AHEAD)
            model.close()
            loss = 6.0 * cks[0].num_parameters() * 256  # a task-loss step: a batch of 256, both ways
            sweeps = run.matcher.planned_sweeps(run.matcher_data, sweep)
            extra = run.matcher.planned_flops(sweep, loss, run.matcher_data)
        else:  # merge-many: every model against the mean, each round
            sweeps, extra = EXPECTED_SWEEPS * len(cks), 0.0
        seconds += sweeps * (sweep / matmul_rate(half) + laps) + extra / nominal_rate(run.device)
    if run.data is not None:
        params = cks[0].num_parameters()
        peak += 3 * 4 * params + (HF_BYTES if hf else 0)  # the evaluation's models (float32)
        if run.evaluation is not None:
            d = load_data(run.data.name, run.seed)
            n = min(len(d.y_train), run.data.max_train or len(d.y_train)) + len(d.y_test)
            tokens = math.prod(d.x_train.shape[1:]) if not d.x_train.is_floating_point() else 1
            passes = 2 * run.evaluation.alphas * (2 if run.data.bn != "none" else 1)
            seconds += passes * n * tokens * 2 * params / matmul_rate()
            peak += d.x_train.element_size() * d.x_train.numel() + d.x_test.element_size() * d.x_test.numel()
    if run.command != "barrier":
        seconds += pair_bytes / 2 / WRITE_BYTES_PER_S
    return {
        "seconds": round(seconds, 1),
        "peak_bytes": int(peak),
        "basis": f"{'bfloat16 weights multiplied' if half else 'float32 matmul'} at "
        f"{matmul_rate(half) / 1e9:.0f} GFLOP/s measured here, "
        + (f"{sweeps:g} sweeps of products, " if sweeps else "")
        + f"reads at {READ_BYTES_PER_S / 1e6:.0f} MB/s"
        + (f", {workers} assignments at once" if workers > 1 else ""),
    }
