"""``rebasin star``: zero steps give the init, runs are deterministic, an interrupted run resumes
bit for bit, one source that is its own init stays connected, and bad calls are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import expect_error, run
from safetensors.torch import load_file

from rebasin.checkpoint import load_checkpoint
from rebasin.evaluate.metrics import task_loss_fns
from rebasin.evaluate.star import StarConfig, train_star
from rebasin.matching import match
from rebasin.models import build_model
from rebasin.spec import infer_spec

FAST = ("--data", "mnist1d", "--alphas", "3", "--max-train", "500")


def test_zero_steps_give_the_init(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    out = tmp_path / "star.safetensors"
    code, stdout, err = run("star", a, b, "-o", out, "--star-steps", "0", "--init", a, *FAST, "--json")
    assert code == 0, err
    got, want = load_file(out), load_file(a)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    rep = json.loads(stdout)
    assert rep["barriers"]["star_to_sources"][0]["naive"] == 0.0  # the star model is A itself
    assert not Path(f"{out}.star-state.pt").exists()


def test_same_seed_same_star(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    outs = []
    for name in ("s1", "s2"):
        out = tmp_path / f"{name}.safetensors"
        code, _, err = run(
            "star", *trained_mlp_pair, "-o", out, "--star-steps", "30", "--refresh", "10", *FAST, "--quiet"
        )
        assert code == 0, err
        outs.append(load_file(out))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_an_interrupted_run_resumes_bit_for_bit(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    sources = [dict(load_checkpoint(p).state) for p in trained_mlp_pair]
    spec = infer_spec(sources[0])
    args = {"in_features": 40, "hidden": 128, "depth": 2, "num_classes": 10}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 40, generator=g), torch.randint(0, 10, (256,), generator=g)
    loss, _ = task_loss_fns(lambda: build_model("mlp", **args), sources[0], x, y, batch_size=32)
    torch.manual_seed(5)
    init = build_model("mlp", **args).state_dict()

    def align(star, src):
        return match(star, src, spec).perm

    whole, losses = train_star(init, sources, spec, loss, align, StarConfig(40, 10, 1e-3, 3))
    state = tmp_path / "state.pt"
    train_star(init, sources, spec, loss, align, StarConfig(20, 10, 1e-3, 3), state)  # stops at 20
    resumed, resumed_losses = train_star(
        init, sources, spec, loss, align, StarConfig(40, 10, 1e-3, 3), state, True
    )
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert losses == resumed_losses
    zero, _ = train_star(init, sources, spec, loss, align, StarConfig(0, 10, 1e-3, 3))
    assert all(torch.equal(zero[k], init[k]) for k in init)


def test_the_state_file_is_never_silently_replaced(
    trained_mlp_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "star.safetensors"
    Path(f"{out}.star-state.pt").write_bytes(b"x")
    expect_error(
        ["star", *trained_mlp_pair, "-o", out, *FAST],
        f"a star training state from an earlier run is here: {out}.star-state.pt",
        "pass --resume to continue it, or --force to start over",
    )
    other = tmp_path / "other.safetensors"
    expect_error(
        ["star", *trained_mlp_pair, "-o", other, "--resume", *FAST],
        f"--resume: no star training state to continue ({other}.star-state.pt)",
        "run without --resume",
    )
    expect_error(["star", *trained_mlp_pair, *FAST], "Missing option '--output' / '-o'.")


@pytest.mark.parametrize("extra", [(), ("--average", "4")])
def test_report_lists_sources_held_out_and_pairs(
    trained_mlp_pair: tuple[Path, Path], tmp_path: Path, extra: tuple[str, ...]
) -> None:
    a, b = trained_mlp_pair
    out = tmp_path / "star.safetensors"
    code, stdout, err = run(
        "star", a, "-o", out, "--held-out", b, "--star-steps", "10", *FAST, *extra, "--json"
    )
    assert code == 0, err
    rep = json.loads(stdout)
    bars = rep["barriers"]
    assert [r["model"] for r in bars["star_to_sources"]] == [str(a)]
    assert [r["model"] for r in bars["star_to_held_out"]] == [str(b)]
    assert bars["between_sources"] == []
    if extra:
        assert set(rep["average"]) == {"points", "star_domain_average", "sources_ensemble", "star_model"}
        assert 0.0 <= rep["average"]["star_domain_average"]["ece"] <= 1.0


def test_with_one_source_training_walks_the_path_to_it(trained_mlp_pair: tuple[Path, Path]) -> None:
    """Each step's loss is the task loss at a point of the segment from the star model to the
    aligned source: replayed independently, the first step's point gives the same loss."""
    import numpy as np

    from rebasin.permutation import permute

    source = dict(load_checkpoint(trained_mlp_pair[1]).state)
    spec = infer_spec(source)
    args = {"in_features": 40, "hidden": 128, "depth": 2, "num_classes": 10}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 40, generator=g), torch.randint(0, 10, (128,), generator=g)
    loss, _ = task_loss_fns(lambda: build_model("mlp", **args), source, x, y, batch_size=32)
    torch.manual_seed(9)
    init = build_model("mlp", **args).state_dict()

    def align(star, src):
        return match(star, src, spec).perm

    _, losses = train_star(init, [source], spec, loss, align, StarConfig(1, 1, 1e-3, 4))
    rng = np.random.default_rng(4)
    assert int(rng.integers(1)) == 0
    alpha = float(rng.random())
    aligned = permute(source, spec, align(init, source))
    point = {k: (1 - alpha) * v.float() + alpha * aligned[k].float() for k, v in init.items()}
    assert losses[0] == float(loss(point, 0))


def test_a_star_language_model_loads_in_transformers(tmp_path: Path) -> None:
    """Hugging Face sources: the random init is a properly initialized model (they are built
    uninitialized for loading), and the star model loads with the model's own library."""
    import numpy as np
    import transformers
    from helpers import tiny

    folders = []
    for i in (0, 1):
        tiny("gpt2", i).save_pretrained(tmp_path / f"lm{i}")
        folders.append(tmp_path / f"lm{i}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (96, 16), generator=g).numpy()
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, input_ids=ids[:64], input_ids_test=ids[64:])
    out = tmp_path / "star"
    code, stdout, err = run(
        "star",
        *folders,
        "-o",
        out,
        "--data",
        tokens,
        "--star-steps",
        "5",
        "--refresh",
        "5",
        "--alphas",
        "3",
        "--json",
    )
    assert code == 0, err
    assert json.loads(stdout)["star"]["loss_last"] is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids[64:])).logits
    assert bool(torch.isfinite(logits).all())
