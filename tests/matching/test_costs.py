"""Incremental weight-matching costs: kept products updated by what moved equal a full
recomputation, wherever they are kept (memory, scratch files, nowhere)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny

from rebasin.matching import match
from rebasin.matching.assignment import solve_unit
from rebasin.matching.costs import CostModel, ProductCache
from rebasin.models import build_model
from rebasin.permutation import permute, random_permutation
from rebasin.spec import PermutationSpec, infer_spec

MODELS = {"mlp": {"in_features": 16, "hidden": 48, "depth": 3}, "resnet20": {"width": 1}, "vgg": {}}
FAMILIES = [*MODELS, "gpt2", "llama"]  # fused q|k|v segments; attention heads (inner > 1)


def pair(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], PermutationSpec]:
    """Two random models of one family, and their spec (with heads for the transformers)."""
    if name in MODELS:
        torch.manual_seed(0)
        a = build_model(name, **MODELS[name]).state_dict()
        torch.manual_seed(1)
        b = build_model(name, **MODELS[name]).state_dict()
        return a, b, infer_spec(a)
    models = [tiny(name, s) for s in (0, 1)]
    a, b = (dict(m.state_dict()) for m in models)
    return a, b, infer_spec(a, config=models[0].config.to_dict())


def partly_moved(perm: dict[str, torch.Tensor], k: int, seed: int) -> dict[str, torch.Tensor]:
    """``perm`` with ``k`` units of every group swapped among themselves."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in perm.items():
        p = p.clone()
        idx = torch.randperm(len(p), generator=g)[: min(k, len(p))]
        p[idx] = p[idx[torch.randperm(len(idx), generator=g)]]
        out[name] = p
    return out


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("where", ["memory", "scratch", "slow scratch", "failing scratch", "none"])
@pytest.mark.parametrize("sketch", [1, 4])
def test_updated_costs_equal_a_full_recomputation(monkeypatch, name: str, where: str, sketch: int) -> None:
    """Wherever the costs are kept: in memory, in scratch files (written in a thread; slow
    writes serve them from memory meanwhile; failed writes drop them), or nowhere."""
    a, b, spec = pair(name)
    write = ProductCache._write
    if where == "slow scratch":

        def slow(self: ProductCache, *args: object) -> None:
            time.sleep(0.02)
            write(self, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(ProductCache, "_write", slow)
    if where == "failing scratch":

        def failing(self: ProductCache, g: str, value: torch.Tensor, path: Path) -> None:
            write(self, g, value, path.parent / "gone" / path.name)  # the write raises OSError

        monkeypatch.setattr(ProductCache, "_write", failing)
    kept = CostModel(
        a,
        b,
        spec,
        torch.device("cpu"),
        memory_bytes=1 << 30 if where == "memory" else 0,
        scratch="scratch" in where,
    )
    kept.sketch = sketch
    perm = random_permutation(spec, 0)
    for step, k in enumerate([0, 1, 3, 10_000, 2, 0]):  # few moved, all moved, none moved
        perm = partly_moved(perm, k, step)
        fresh = CostModel(a, b, spec, torch.device("cpu"), memory_bytes=0, scratch=False)
        fresh.sketch = sketch
        for g in spec.sizes:
            got, want = kept.cost(g, perm), fresh.cost(g, perm)
            scale = max(1.0, float(np.abs(want).max()))
            assert np.abs(got - want).max() <= 1e-5 * scale, (g, step)
    if where == "failing scratch":
        assert kept.kept.place == {}  # every group recomputed after its write failed
    elif where != "none":
        assert kept.products["update"] > 0 and kept.products["reused"] > 0
    kept.close()


def test_scratch_files_are_removed_when_matching_ends(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr("rebasin.matching.costs.MEMORY_BYTES", 0)
    monkeypatch.setattr("rebasin.matching.costs.SCRATCH_RESERVE", 0)
    a, b, spec = pair("mlp")
    seen = []
    real = CostModel.close

    def close(self: CostModel) -> None:
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real(self)

    monkeypatch.setattr(CostModel, "close", close)
    match(a, b, spec)
    assert seen and seen[0], "the products were kept in scratch files"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("memory", [0, 1 << 30])
def test_kept_products_leave_the_result_unchanged(monkeypatch, memory: int) -> None:
    """Planted and unplanted pairs: the same permutation with products kept or recomputed."""
    a, b, spec = pair("resnet20")
    planted = dict(permute(a, spec, random_permutation(spec, 3)))
    for other in (b, planted):
        monkeypatch.setattr("rebasin.matching.costs.MEMORY_BYTES", memory)
        monkeypatch.setattr("rebasin.matching.costs.UPDATE_SHARE", 0.5)
        monkeypatch.setattr("rebasin.matching.costs.FRESH_BYTES", 512 << 20)
        kept = match(a, other, spec, restarts=2)
        monkeypatch.setattr("rebasin.matching.costs.UPDATE_SHARE", -1.0)  # always recompute
        monkeypatch.setattr("rebasin.matching.costs.MEMORY_BYTES", 0)
        monkeypatch.setattr("rebasin.matching.costs.FRESH_BYTES", 0)  # no neighbours' products
        fresh = match(a, other, spec, restarts=2)
        assert all(torch.equal(kept.perm[g], fresh.perm[g]) for g in spec.sizes)
        assert kept.objective == fresh.objective
    back = permute(planted, spec, kept.perm)
    assert all(torch.equal(back[k], a[k]) for k in a)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("memory", [0, 1 << 30])
def test_neighbours_products_after_a_solve_equal_a_full_recomputation(name: str, memory: int) -> None:
    """Units solved one after another, moving many units or few: each group's cost, from its
    kept cost, from the products its solved neighbours computed from their tensors, or from
    both, equals a full recomputation; the neighbours' products save reads."""
    a, b, spec = pair(name)
    model = CostModel(a, b, spec, torch.device("cpu"), memory_bytes=memory, scratch=False)
    perm = {g: torch.arange(n) for g, n in spec.sizes.items()}
    for g in spec.sizes:
        model.cost(g, perm)  # kept costs at the start, where memory lets them be kept
    for step, k in enumerate([10_000, 10_000, 1, 10_000, 0]):
        for i, unit in enumerate(spec.units):
            model.unit_costs(unit, perm)
            moved = partly_moved({g: perm[g] for g in unit}, k if i % 3 else 1, 10 * step + i)
            perm.update(moved)
            model.solved(unit, perm, k > 0)
        fresh = CostModel(a, b, spec, torch.device("cpu"), memory_bytes=0, scratch=False)
        for g in spec.sizes:
            got, want = model.cost(g, perm), fresh.cost(g, perm)
            scale = max(1.0, float(np.abs(want).max()))
            assert np.abs(got - want).max() <= 1e-5 * scale, (g, step)
    if any(len(m) > 1 for m in model._shared.values()):  # some tensor has two moving groups
        assert model.products["reused"] > 0
    model.close()


def test_a_transformer_s_residual_stream_is_not_read_again_after_its_neighbours_moved() -> None:
    """The residual stream's second cost, after every other unit moved, reads no tensor that
    another group touches: their products came with the neighbours' solves."""
    a, b, spec = pair("llama")
    model = CostModel(a, b, spec, torch.device("cpu"))
    perm = {g: torch.roll(torch.arange(n), 1) for g, n in spec.sizes.items()}  # every unit moves
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    residual = (model.gather,)
    assert residual == ("residual",)
    model.unit_costs(residual, ident)
    for unit in spec.units:
        if unit != residual:
            model.unit_costs(unit, ident)
            ident.update({g: perm[g] for g in unit})
            model.solved(unit, ident, True)
    before = model.bytes_read["products"]
    got = model.unit_costs(residual, ident)
    assert model.bytes_read["products"] == before
    fresh = CostModel(a, b, spec, torch.device("cpu"), memory_bytes=0, scratch=False)
    for g, c in got.items():
        want = fresh.cost(g, ident)
        assert np.abs(c - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    model.close()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["planted", "independent"])
def test_units_too_large_to_hold_are_held_through_a_quick_assignment(
    monkeypatch, name: str, kind: str
) -> None:
    """Units past HOLD_BYTES (every unit here) are still held when their assignment is quick:
    head-structured, or read off the rows (a planted pair once the residual stream is solved).
    The residual stream's second cost then reads nothing on a planted pair; an independent
    pair's plain units are not held, and their tensors are read again. Either way the cost
    equals a full recomputation."""
    monkeypatch.setattr("rebasin.matching.costs.HOLD_BYTES", 0)
    a, b, spec = pair(name)
    if kind == "planted":
        b = dict(permute(a, spec, random_permutation(spec, 7)))
    model = CostModel(a, b, spec, torch.device("cpu"))
    perm = {g: torch.arange(n) for g, n in spec.sizes.items()}
    residual = (model.gather,)

    def solve(unit: tuple[str, ...]) -> None:
        costs = model.unit_costs(unit, perm)
        held.append(unit in model._held)
        perm.update({g: torch.from_numpy(p) for g, p in solve_unit(costs, spec.heads).items()})
        model.solved(unit, perm, True)

    held: list[bool] = []
    solve(residual)
    held.clear()
    for unit in spec.units:
        if unit != residual:
            solve(unit)
    heads = [any(g in spec.heads for g in u) for u in spec.units if u != residual]
    assert held == [True] * len(held) if kind == "planted" else held == heads
    before = model.bytes_read["products"]
    got = model.unit_costs(residual, perm)
    assert (model.bytes_read["products"] == before) == (kind == "planted")
    fresh = CostModel(a, b, spec, torch.device("cpu"), memory_bytes=0, scratch=False)
    for g, c in got.items():
        want = fresh.cost(g, perm)
        assert np.abs(c - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    model.close()


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_bfloat16_costs_equal_float64_products(name: str) -> None:
    """Costs of bfloat16 weights (at the CPU's bfloat16 rate where it has one) equal the float64
    products of the same values, to float32 summation order."""
    a, b, spec = pair(name)
    a, b = ({k: v.to(torch.bfloat16) for k, v in sd.items()} for sd in (a, b))
    half = CostModel(a, b, spec, torch.device("cpu"), memory_bytes=1 << 30, scratch=False)
    a64, b64 = ({k: v.double() for k, v in sd.items()} for sd in (a, b))
    exact = CostModel(a64, b64, spec, torch.device("cpu"), memory_bytes=0, scratch=False)
    perm = random_permutation(spec, 0)
    for step, k in enumerate([0, 3, 0]):  # computed, updated (float32 differences), reused
        perm = partly_moved(perm, k, step)
        for g in spec.sizes:
            got, want = half.cost(g, perm), exact.cost(g, perm)
            scale = max(1.0, float(np.abs(want).max()))
            assert np.abs(got - want).max() <= 1e-5 * scale, (g, step)
    half.close()


def test_reach_is_the_work_of_the_neighbours_costs() -> None:
    a, b, spec = pair("mlp")
    model = CostModel(a, b, spec, torch.device("cpu"), memory_bytes=0, scratch=False)
    for g in spec.sizes:
        near = [h for h in spec.neighbours[g] if h != g]
        assert model.reach((g,)) == sum(model.work((h,)) for h in near)


@pytest.mark.parametrize("name", FAMILIES)
def test_models_kept_on_a_device_with_room_give_the_same_answer_from_one_read(monkeypatch, name: str) -> None:
    """Where the device has room for both models (a GPU; here the CPU made to look like one),
    every tensor is read once and kept there: the permutations, objectives and group figures
    are those of streaming them, bit for bit."""
    from rebasin.matching.weight import weight_matching

    a, b, spec = pair(name)
    planted = dict(permute(a, spec, random_permutation(spec, 3)))
    for other in (b, planted):
        streamed = weight_matching(a, other, spec, seed=1, restarts=2)
        monkeypatch.setattr("rebasin.matching.costs._device_room", lambda device: 1 << 40)
        kept = weight_matching(a, other, spec, seed=1, restarts=2)
        monkeypatch.undo()
        assert (streamed.profile["resident"], kept.profile["resident"]) == (0, 1)
        assert all(torch.equal(streamed.perm[g], kept.perm[g]) for g in spec.sizes)
        assert streamed.history == kept.history and streamed.groups == kept.groups
        pair_bytes = sum(2 * a[p].numel() * a[p].element_size() for p in spec.cost_params())
        read = kept.profile["products_read_bytes"] + kept.profile["objective_read_bytes"]
        assert (
            read
            <= pair_bytes
            < streamed.profile["products_read_bytes"] + streamed.profile["objective_read_bytes"]
        )
