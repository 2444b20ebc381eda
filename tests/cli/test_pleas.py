"""``merge --method pleas``: nothing merged is the ensemble exactly (MLP, ResNet with BatchNorm,
separate heads), everything merged on a planted pair gives A back, least squares on exact
targets leaves no residual, no layer fits worse than where it started, the widened output
rebuilds from its record alone (built-in and Hugging Face models), and bad calls are one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import expect_error, run
from safetensors.torch import load_file

from rebasin.checkpoint import load_checkpoint, save_checkpoint
from rebasin.models.fit import load_into
from rebasin.models.resolve import ModelRef, resolve_model
from rebasin.pleas.layout import Layout, merged_count, place
from rebasin.pleas.lstsq import residual, solve_rows

MLP = {"in_features": 40, "hidden": 32, "depth": 2, "num_classes": 10}
RESNET = {"blocks": [1, 1], "widths": [4, 8], "in_channels": 1, "num_classes": 10}


def _write(tmp: Path, name: str, arch: str, args: dict[str, Any], seed: int) -> Path:
    ref = ModelRef(arch, args)
    torch.manual_seed(seed)
    model = ref.build()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp / f"{name}.safetensors"
    save_checkpoint({k: v.contiguous() for k, v in model.state_dict().items()}, path, ref.metadata())
    return path


def _model_of(path: Path) -> torch.nn.Module:
    """The model a checkpoint's own record builds, loaded with it (as later commands do)."""
    ck = load_checkpoint(path)
    ref = resolve_model(None, None, ck.metadata, ck.name, ck.config)
    model = ref.build()
    load_into(model, ck.state, ck.name, ref.name)
    return model.eval()


def _images(tmp: Path) -> Path:
    g = np.random.default_rng(0)
    path = tmp / "img.npz"
    np.savez(path, x=g.standard_normal((300, 1, 6, 6)).astype(np.float32), y=g.integers(0, 10, 300))
    return path


def _pleas(a: Path, b: Path, out: Path, *args: str | Path) -> dict[str, Any]:
    code, stdout, err = run("merge", a, b, "-o", out, "--method", "pleas", *args, "--json")
    assert code == 0, err
    return dict(json.loads(stdout))


def test_nothing_merged_is_the_ensemble(tmp_path: Path) -> None:
    a, b = (_write(tmp_path, f"m{s}", "mlp", MLP, s) for s in (0, 1))
    out = tmp_path / "wide.safetensors"
    rep = _pleas(a, b, out, "--data", "mnist1d", "--width", "2.0")
    assert all(
        g["merged"] == 0 and g["merged_size"] == 2 * g["size"] for g in rep["pleas"]["groups"].values()
    )
    x = torch.randn(64, 40)
    with torch.no_grad():
        want = (_model_of(a)(x) + _model_of(b)(x)) / 2
        got = _model_of(out)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert rep["tasks"]["a"]["pleas"]["acc"] == rep["tasks"]["a"]["ensemble"]["acc"]


def test_nothing_merged_is_the_ensemble_for_a_resnet(tmp_path: Path) -> None:
    """Convolutions, BatchNorm (kept as each model's own with --bn none) and residual streams."""
    a, b = (_write(tmp_path, f"r{s}", "resnet", RESNET, s) for s in (0, 1))
    data, out = _images(tmp_path), tmp_path / "wide.safetensors"
    _pleas(a, b, out, "--data", data, "--width", "2.0", "--bn", "none")
    x = torch.randn(16, 1, 6, 6)
    with torch.no_grad():
        want = (_model_of(a)(x) + _model_of(b)(x)) / 2
        got = _model_of(out)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_separate_heads_answer_each_task_with_its_own(tmp_path: Path) -> None:
    a, b = (_write(tmp_path, f"m{s}", "mlp", MLP, s) for s in (0, 1))
    out = tmp_path / "two.safetensors"
    rep = _pleas(
        a, b, out, "--data", "mnist1d", "--data-b", "mnist1d", "--task-heads", "separate", "--width", "2.0"
    )
    assert set(rep["tasks"]) == {"a", "b"} and "b" not in rep["tasks"]["a"]
    assert load_checkpoint(out).metadata["rebasin.heads"] == "[10, 10]"
    x = torch.randn(32, 40)
    with torch.no_grad():
        logits = _model_of(out)(x)
        torch.testing.assert_close(logits[:, :10], _model_of(a)(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[:, 10:], _model_of(b)(x), rtol=1e-5, atol=1e-5)


def test_everything_merged_on_a_planted_pair_gives_a(tmp_path: Path) -> None:
    a = _write(tmp_path, "a", "mlp", MLP, 0)
    b = tmp_path / "b.safetensors"
    assert run("permute", a, "--seed", "3", "-o", b, "--quiet")[0] == 0
    out = tmp_path / "same.safetensors"
    rep = _pleas(a, b, out, "--data", "mnist1d", "--width", "1.0")
    got, want = load_file(out), load_file(a)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert all(f["residual_after"] < 1e-10 for f in rep["pleas"]["layers"])


def test_least_squares_on_exact_targets_leaves_no_residual() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    w_true = torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = x @ w_true.T
    gram, cross, yy = x.T @ x, x.T @ y, (y * y).sum(0)
    w = solve_rows(
        gram, cross, torch.zeros(5, 12, dtype=torch.float64), torch.arange(5), torch.arange(12), 0.0
    )
    torch.testing.assert_close(w, w_true)
    assert residual(gram, cross, yy, w) < 1e-12  # zero up to float64 rounding of the expansion


def test_no_layer_fits_worse_than_the_placed_average(
    trained_mlp_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    rep = _pleas(*trained_mlp_pair, tmp_path / "m.safetensors", "--data", "mnist1d", "--width", "1.25")
    layers = rep["pleas"]["layers"]
    assert [f["layer"] for f in layers] == ["net.0", "net.2", "net.4"]
    assert all(f["residual_after"] <= f["residual_before"] for f in layers)
    groups = rep["pleas"]["groups"]
    assert {g: (s["merged"], s["kept"]) for g, s in groups.items()} == {
        "P_net.0": (96, 32),
        "P_net.2": (96, 32),
    }


def test_the_widened_output_rebuilds_from_its_record(
    trained_mlp_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "m.safetensors"
    rep = _pleas(*trained_mlp_pair, out, "--data", "mnist1d", "--width", "1.5")
    ck = load_checkpoint(out)
    assert json.loads(ck.metadata["rebasin.arch_shapes"])["net.2.weight"] == [192, 192]
    code, _, err = run("inspect", out, "--json")
    assert code == 0, err
    code, _, err = run("barrier", out, out, "--data", "mnist1d", "--alphas", "3", "--json")
    assert code == 0, err
    again = tmp_path / "again.safetensors"  # a later merge of two merged models of one shape
    assert run("merge", out, out, "-o", again, "--quiet")[0] == 0
    assert load_file(again)["net.2.weight"].shape == (192, 192)
    from rebasin.data import load_data
    from rebasin.evaluate.metrics import evaluate

    d = load_data("mnist1d", 0)
    assert evaluate(_model_of(out), d.x_test, d.y_test).acc == rep["tasks"]["a"]["pleas"]["acc"]


def test_a_parameter_budget_picks_the_width(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a_params = load_checkpoint(trained_mlp_pair[0]).num_parameters()
    budget = int(1.5 * a_params)
    rep = _pleas(
        *trained_mlp_pair, tmp_path / "m.safetensors", "--data", "mnist1d", "--budget-params", str(budget)
    )
    assert rep["pleas"]["parameters"]["merged"] <= budget
    widths = {s["width"] for s in rep["pleas"]["groups"].values()}
    assert len(widths) == 1 and 1.0 < widths.pop() < 2.0


def test_data_free_takes_features_from_another_source(tmp_path: Path) -> None:
    a, b = (_write(tmp_path, f"m{s}", "mlp", MLP, s) for s in (0, 1))
    src = tmp_path / "noise.npz"
    g = np.random.default_rng(1)
    np.savez(src, x=g.standard_normal((100, 40)).astype(np.float32), y=np.zeros(100, dtype=np.int64))
    rep = _pleas(a, b, tmp_path / "m.safetensors", "--data", "mnist1d", "--data-free", src)
    assert all(f["rows"] == 80 for f in rep["pleas"]["layers"])  # the source's training split
    assert rep["method"]["options"]["data_free"] == str(src)


def test_a_transformer_widens_its_mlp_blocks_only(tmp_path: Path) -> None:
    args = {"seq_len": 40, "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2}
    a, b = (_write(tmp_path, f"t{s}", "transformer", args, s) for s in (0, 1))
    out = tmp_path / "t.safetensors"
    rep = _pleas(a, b, out, "--data", "mnist1d")
    sizes = {g: s["merged_size"] for g, s in rep["pleas"]["groups"].items()}
    assert sizes["P_blocks.0.mlp"] == 48 and sizes["P_residual"] == 16
    assert _model_of(out)(torch.randn(2, 40)).shape == (2, 10)
    wide = tmp_path / "wide.safetensors"  # the residual stream widens when named; heads stay
    rep = _pleas(a, b, wide, "--data", "mnist1d", "--group-width", "P_residual=1.5")
    assert rep["pleas"]["groups"]["P_residual"]["merged_size"] == 24
    assert rep["pleas"]["groups"]["P_blocks.0.attn.qk"]["merged_size"] == 16
    assert _model_of(wide)(torch.randn(2, 40)).shape == (2, 10)
    code, _, err = run("spec", wide, "--json")  # names still give its groups
    assert code == 0, err


def test_a_hugging_face_model_records_its_width_in_config(tmp_path: Path) -> None:
    t = pytest.importorskip("transformers")
    small = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24, "hidden_size": 16}
    folders = []
    for s in (0, 1):
        torch.manual_seed(s)
        cfg = t.BertConfig(vocab_size=30, max_position_embeddings=16, num_labels=3, **small)
        t.BertForSequenceClassification(cfg).save_pretrained(tmp_path / f"bert{s}")
        folders.append(tmp_path / f"bert{s}")
    g = np.random.default_rng(0)
    data = tmp_path / "seq.npz"
    ids = g.integers(4, 30, (40, 8))
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids), labels=g.integers(0, 3, 40))
    out = tmp_path / "merged"
    rep = _pleas(*folders, out, "--data", data, "--width", "1.5")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 36
    model = t.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.bert.encoder.layer[0].intermediate.dense.weight.shape == (36, 16)
    assert rep["pleas"]["groups"]["residual"]["merged_size"] == 16


def test_gpt2_keeps_its_tied_head(tmp_path: Path) -> None:
    t = pytest.importorskip("transformers")
    folders = []
    for s in (0, 1):
        torch.manual_seed(s)
        cfg = t.GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        t.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / f"gpt{s}")
        folders.append(tmp_path / f"gpt{s}")
    g = np.random.default_rng(0)
    data = tmp_path / "tok.npz"
    ids = g.integers(0, 30, (40, 8))
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids))
    out = tmp_path / "merged"
    rep = _pleas(*folders, out, "--data", data, "--width", "1.5")
    assert "lm_head" not in [f["layer"] for f in rep["pleas"]["layers"]]
    assert json.loads((out / "config.json").read_text())["n_inner"] == 96
    model = t.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_layouts_place_units_as_documented() -> None:
    lay = Layout.of(torch.tensor([0, 2]), 4)
    assert lay.a.tolist() == [0, 2, 1, 3, -1, -1] and lay.b.tolist() == [0, 2, -1, -1, 1, 3]
    assert (lay.merged, lay.kept, lay.size) == (2, 2, 6)
    assert merged_count(4, 1.0) == 4 and merged_count(4, 2.0) == 0 and merged_count(4, 1.5) == 2
    wa, wb = torch.ones(4, 3), 3 * torch.ones(4, 3)
    got = place(wa, wb, [(lay, 1)], 0)  # rows: merged average, A's kept, B's kept
    assert got[:, 0].tolist() == [2.0, 2.0, 1.0, 1.0, 3.0, 3.0]
    head = place(torch.ones(2, 4), 3 * torch.ones(2, 4), [None, (lay, 1)], 0)  # a shared output
    assert head[0].tolist() == [2.0, 2.0, 0.5, 0.5, 1.5, 1.5]


def test_bad_calls_are_one_line(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    out = tmp_path / "m.safetensors"
    base: list[str | Path] = ["merge", a, b, "-o", out, "--data", "mnist1d"]
    expect_error([*base, "--width", "1.5"], "--width applies to --method pleas only")
    pleas: list[str | Path] = [*base, "--method", "pleas"]
    expect_error(
        [*pleas, "--width", "1.5", "--budget-params", "100"], "give --width or --budget-params, not both"
    )
    expect_error(
        [*pleas, "--group-width", "P_nope=1.5"],
        "--group-width 'P_nope' names no group",
        "groups: P_net.0, P_net.2",
    )
    expect_error(
        [*pleas, "--group-width", "P_net.0=3"],
        "--group-width 'P_net.0=3': expected GROUP=W with W from 1.0 to 2.0",
    )
    expect_error(
        [*pleas, "--budget-params", "100"],
        "--budget-params 100: even with every group merged whole the model has 23050 parameters",
        "raise the budget, or lower the widths --group-width names",
    )
    expect_error(
        [*pleas, "--task-heads", "separate"], "--task-heads separate needs B's task's data: pass --data-b"
    )
    expect_error(
        [*pleas, "--data-free", "digits"],
        "--data-free digits: its inputs (shape (1, 8, 8)) do not fit the model",
        "give a source whose inputs have the shape of the tasks' inputs",
    )
    assert not out.exists()


def test_a_headless_model_with_a_stored_buffer_keeps_its_function(tmp_path: Path) -> None:
    """As on the published all-MiniLM-L6-v2 (BertModel, ``embeddings.position_ids`` stored): PLeaS
    of a model and a permutation of it computes the model's features at any width."""
    t = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    small = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24, "hidden_size": 16}
    t.BertModel(t.BertConfig(vocab_size=30, max_position_embeddings=16, **small)).save_pretrained(
        tmp_path / "a"
    )
    weights = load_file(tmp_path / "a" / "model.safetensors")
    weights["embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    save_file(weights, tmp_path / "a" / "model.safetensors", metadata={"format": "pt"})
    assert run("permute", tmp_path / "a", "--seed", "1", "-o", tmp_path / "b", "--quiet")[0] == 0
    g = np.random.default_rng(0)
    data = tmp_path / "tok.npz"
    ids = g.integers(0, 30, (40, 8))
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids))
    out = tmp_path / "merged"
    rep = _pleas(tmp_path / "a", tmp_path / "b", out, "--data", data, "--width", "1.5")
    assert rep["tasks"] == {}  # no task head: nothing to score
    assert torch.equal(
        load_file(out / "model.safetensors")["embeddings.position_ids"], weights["embeddings.position_ids"]
    )
    x = torch.from_numpy(ids[:4])
    with torch.no_grad():
        want = t.BertModel.from_pretrained(tmp_path / "a").eval()(x).last_hidden_state
        got = t.BertModel.from_pretrained(out).eval()(x).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
