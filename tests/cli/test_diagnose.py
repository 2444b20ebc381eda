"""``rebasin diagnose`` and ``merge --diagnose``: singular-direction agreement is 1 after aligning
a planted pair, depends only on the aligned model, and the merge computes the same figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run

from rebasin.checkpoint import load_checkpoint
from rebasin.evaluate.diagnose import gather, overlap, top_singular
from rebasin.permutation import compose, invert, permute, random_permutation
from rebasin.spec import infer_spec


@pytest.fixture(scope="module")
def planted(
    trained_mlp_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    a = trained_mlp_pair[0]
    b = tmp_path_factory.mktemp("planted") / "b.safetensors"
    code, _, err = run("permute", a, "-o", b, "--seed", "5")
    assert code == 0, err
    return a, b


def diagnosis(*args: str | Path) -> dict:
    code, out, err = run("diagnose", *args, "--json")
    assert code == 0, err
    return json.loads(out)["diagnosis"]


def test_a_planted_pair_agrees_fully_after_alignment(planted: tuple[Path, Path]) -> None:
    d = diagnosis(*planted, "--method", "weight", "--data", "mnist1d", "--alphas", "5", "--max-train", "500")
    assert d["tensors"], "every weight tensor is diagnosed"
    for r in d["tensors"]:
        assert r["after"]["agreement"] == pytest.approx(1.0, abs=1e-5), r["tensor"]
    assert min(r["before"]["agreement"] for r in d["tensors"]) < 0.9
    assert d["barrier"]["whole_path"] == 0.0
    assert all(layer["barrier"] == 0.0 for layer in d["layers"])


def test_agreement_depends_only_on_the_aligned_model(trained_mlp_pair: tuple[Path, Path]) -> None:
    a, b = (load_checkpoint(p).state for p in trained_mlp_pair)
    a, b = dict(a), dict(b)
    spec = infer_spec(a)
    pi = random_permutation(spec, 1)  # any alignment of B
    sigma = random_permutation(spec, 2)  # B replaced by a function-preserving permutation of it
    b2 = dict(permute(b, spec, sigma))
    first = gather(a, b, spec, pi, 8)
    second = gather(a, b2, spec, compose(invert(sigma), pi), 8)  # undo sigma, then apply pi
    assert [r["after"] for r in first] == [r["after"] for r in second]


def test_merge_diagnose_gives_the_same_figures(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    d = diagnosis(*trained_mlp_pair, "--method", "weight")
    assert d["barrier"] is None  # no data: agreements only
    code, out, err = run(
        "merge",
        *trained_mlp_pair,
        "-o",
        tmp_path / "m.safetensors",
        "--method",
        "weight",
        "--diagnose",
        "--json",
    )
    assert code == 0, err
    m = json.loads(out)["diagnosis"]
    assert m["tensors"] == d["tensors"]


def test_the_plot_and_table(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    plot = tmp_path / "d.png"
    code, out, err = run("diagnose", *trained_mlp_pair, "--method", "weight", "--plot", plot, "--top-k", "4")
    assert code == 0, err
    assert "top-4 singular directions" in out and "net.0.weight" in out
    assert plot.exists() and plot.with_suffix(".svg").exists()
    code, _, err = run("diagnose", *trained_mlp_pair, "--method", "none")
    assert code == 2 and "none" in err


def test_randomized_top_k_finds_the_exact_subspaces() -> None:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(1500, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(1300, 40, generator=g))
    s = torch.logspace(2, -2, 40)
    m = u @ torch.diag(s) @ v.T + 1e-3 * torch.randn(1500, 1300, generator=g)
    ur, sr, vr = top_singular(m, 8)  # randomized (both sides above the exact limit)
    assert overlap(ur, u[:, :8]) > 0.999 and overlap(vr, v[:, :8]) > 0.999
    assert torch.allclose(sr, s[:8], rtol=1e-3)
