"""Batch plans and barriers on a real local Ray instance: the same results as a serial run."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import expect_error, run, same_figure

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_not_installed_is_one_line(
    trained_mlp_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = trained_mlp_pair
    monkeypatch.setitem(sys.modules, "ray", None)
    assert not ray.is_initialized()  # runs before the module's Ray instance starts
    hint = 'pip install "basinmerge[ray]"'
    expect_error(
        ["barrier", a, b, "--data", "mnist1d", "--ray", "local"],
        "--ray needs the Ray package, which is not installed",
        hint,
    )
    plan = _plan(tmp_path / "n", a, b, a)
    expect_error(
        ["batch", plan, "--ray", "local"], "--ray needs the Ray package, which is not installed", hint
    )


def _plan(folder: Path, a: Path, b: Path, broken: Path) -> Path:
    folder.mkdir()
    p = folder / "plan.yaml"
    p.write_text(
        f"""
format_version: 1
defaults: {{alphas: 3, method: weight}}
items:
  - {{name: merge, a: {a}, b: {b}, output: merged.safetensors}}
  - {{name: broken, a: {a}, b: {broken}, output: other.safetensors}}
  - {{name: barrier, a: {a}, b: {b}, data: mnist1d}}
  - {{name: merge-data, a: {a}, b: {b}, output: m2.safetensors, data: mnist1d}}
"""
    )
    return p


def test_a_plan_on_ray_gives_the_serial_results(
    local_ray: None, trained_mlp_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = trained_mlp_pair
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint at all")
    serial, parallel = _plan(tmp_path / "s", a, b, broken), _plan(tmp_path / "r", a, b, broken)
    code_s, out_s, _ = run("batch", serial, "--json")
    code_r, out_r, _ = run("batch", parallel, "--ray", "local", "--json")
    assert code_s == code_r == 1  # the broken item fails in both
    rows_s = {r["name"]: r for r in json.loads(out_s)["items"]}
    rows_r = {r["name"]: r for r in json.loads(out_r)["items"]}
    assert {n: r["status"] for n, r in rows_r.items()} == {
        "merge": "ok",
        "broken": "error",
        "barrier": "ok",
        "merge-data": "ok",
    }
    for name in rows_s:
        assert rows_r[name]["status"] == rows_s[name]["status"]
        # a float reduction may run on other thread counts in a worker: equal to float tolerance
        # (the broken item has no barrier: None on both sides)
        assert same_figure(rows_r[name]["barrier"], rows_s[name]["barrier"]), name
    assert rows_s["broken"]["barrier"] is None
    assert rows_r["broken"]["error"] == rows_s["broken"]["error"]
    for out in ("merged.safetensors", "m2.safetensors"):
        assert (tmp_path / "r" / out).read_bytes() == (tmp_path / "s" / out).read_bytes()
    assert not (tmp_path / "r" / "other.safetensors").exists()
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".rebasin-")]


def test_jsonl_streams_rows_as_tasks_finish(
    local_ray: None, trained_mlp_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = trained_mlp_pair
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"x")
    plan = _plan(tmp_path / "j", a, b, broken)
    code, stdout, _ = run("batch", plan, "--ray", "local", "--jsonl")
    assert code == 1
    assert sorted(json.loads(line)["name"] for line in stdout.splitlines()) == sorted(
        ["merge", "broken", "barrier", "merge-data"]
    )


def test_barrier_on_ray_matches_the_serial_report(
    local_ray: None, trained_mlp_pair: tuple[Path, Path]
) -> None:
    a, b = trained_mlp_pair
    args = ["barrier", a, b, "--method", "weight", "--alphas", "5", "--json"]
    code, serial, err = run(*args)
    assert code == 0, err
    code, parallel, err = run(*args, "--ray", "local")
    assert code == 0, err
    s, p = json.loads(serial)["evaluation"], json.loads(parallel)["evaluation"]
    assert p.keys() == s.keys()
    for path in ("naive", "aligned"):
        for key in ("loss", "acc"):
            for split in ("train", "test"):
                got, want = p["paths"][path][key][split], s["paths"][path][key][split]
                assert len(got) == len(want)
                assert all(same_figure(x, y) for x, y in zip(got, want, strict=True)), (path, key, split)
        for split, kinds in s["paths"][path]["barriers"].items():
            for kind, values in kinds.items():
                got = p["paths"][path]["barriers"][split][kind]
                assert got.keys() == values.keys()
                assert all(same_figure(got[d], values[d]) for d in values), (path, split, kind)


def test_shards_of_a_point_add_up_to_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large evaluation sets are cut into shards of whole batches whose sums give the serial
    figures (shown here with small shards on a built-in model, without Ray)."""
    import torch

    from rebasin.data import load_data
    from rebasin.evaluate.paths import PathEvaluator, shard_rows
    from rebasin.models import build_model

    assert [shard_rows(2500, 1000, i, 2) for i in range(2)] == [(0, 2000), (2000, 2500)]
    assert [shard_rows(10, 1000, i, 3) for i in range(3)] == [(0, 10), (10, 10), (10, 10)]
    data = load_data("digits", 0)
    make = lambda: build_model("mlp", in_features=64, hidden=16, depth=2)  # noqa: E731
    torch.manual_seed(0)
    a = make().state_dict()
    torch.manual_seed(1)
    b = make().state_dict()
    ev = PathEvaluator(make, data, batch_size=100)
    whole = ev.curve(a, b, [0.0, 0.5, 1.0])

    class Serial:  # a pool that runs the tasks here, in order
        def share(self, value: object) -> object:
            return value

        def map(self, fn, calls, gpu=False):  # type: ignore[no-untyped-def]
            return (fn(*c) for c in calls)

    monkeypatch.setattr("rebasin.evaluate.paths.SHARD_EXAMPLES", 300)
    sharded = ev.curve(a, b, [0.0, 0.5, 1.0], pool=Serial())
    for split in ("train", "test"):
        assert sharded.loss[split] == pytest.approx(whole.loss[split], rel=1e-12)
        assert sharded.acc[split] == whole.acc[split]


def test_the_pairwise_map_on_ray_matches_the_serial_map(
    local_ray: None, trained_mlp_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = trained_mlp_pair
    c = tmp_path / "c.safetensors"
    c.write_bytes(a.read_bytes())  # a copy of A: its barriers to A are zero, to B those of A
    args = ["barrier", a, b, c, "--method", "weight", "--alphas", "5", "--json"]
    code, serial, err = run(*args)
    assert code == 0, err
    code, parallel, err = run(*args, "--ray", "local")
    assert code == 0, err
    s, p = json.loads(serial)["map"], json.loads(parallel)["map"]
    for key in ("naive", "aligned"):
        assert all(
            same_figure(x, y)
            for rs, rp in zip(s[key], p[key], strict=True)
            for x, y in zip(rs, rp, strict=True)
        )
    assert s["basins"] == p["basins"]
    assert s["naive"][0][2] == 0.0 and s["aligned"][0][2] == 0.0
