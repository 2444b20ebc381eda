"""Every write is verified: pi(B) computes what B computes, checked on a probe batch whenever a
model can be built; headless models (whose output is the residual stream) keep their output."""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from helpers import run
from safetensors.torch import load_file

from rebasin.verify import worker as check_worker


def test_merge_reports_equivalence(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    code, stdout, err = run("merge", a, b, "-o", tmp_path / "m.safetensors", "--json")
    assert code == 0, err
    eq = json.loads(stdout)["equivalence"]
    assert eq["ok"] is True and eq["relative"] < 1e-5 and eq["output_group"] is None
    code, _, err = run("merge", a, b, "-o", tmp_path / "m2.safetensors")
    assert "verified: pi(B) computes what B computes" in err


def test_merge_many_checks_every_model_before_writing(
    trained_mlp_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = trained_mlp_pair
    spec = tmp_path / "wrong.yaml"
    spec.write_text(
        "format_version: 1\ngroups:\n  P_half: {size: 128, members: [[net.0.weight, 0], [net.0.bias, 0]]}\n"
    )
    code, stdout, err = run("merge-many", a, b, "-o", tmp_path / "mm", "--spec", spec)
    assert code == 2 and stdout == ""
    line = err.splitlines()[0]
    assert re.fullmatch(
        r"error: .*: model (1|2) aligned does not compute what model \1 computes \(max abs diff .*\); "
        r"the first group that breaks it: 'P_half'",
        line,
    ), line
    assert sorted(tmp_path.iterdir()) == [spec]


@pytest.mark.parametrize("worker", ["thread", "stopped"])
def test_the_verdict_does_not_depend_on_where_the_check_runs(
    trained_mlp_pair: tuple[Path, Path], tmp_path: Path, worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = trained_mlp_pair
    code, stdout, err = run("merge", a, b, "-o", tmp_path / "m1.safetensors", "--json")
    assert code == 0, err
    first = json.loads(stdout)["equivalence"]
    if worker == "thread":
        monkeypatch.setattr(check_worker, "forking", lambda: False)
    elif not check_worker.forking():
        pytest.skip("the check runs in a worker process only where the system forks")
    else:  # a worker process that dies: the check runs again in the command's own process
        monkeypatch.setattr(check_worker, "_serve", lambda *args: os._exit(3))
    code, stdout, err = run("merge", a, b, "-o", tmp_path / "m2.safetensors", "--json")
    assert code == 0, err
    assert json.loads(stdout)["equivalence"] == first and first["ok"] is True


def test_a_worker_that_hangs_before_it_is_ready_is_replaced(
    trained_mlp_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked worker whose first matrix product never returns (a lock its parent held at the
    fork) says nothing: the command stops it and checks in its own process, with the same verdict."""
    if not check_worker.forking():
        pytest.skip("the check runs in a worker process only where the system forks")
    a, b = trained_mlp_pair
    code, stdout, err = run("merge", a, b, "-o", tmp_path / "m1.safetensors", "--json")
    assert code == 0, err
    first = json.loads(stdout)["equivalence"]
    monkeypatch.setattr(check_worker, "READY_S", 0.2)
    monkeypatch.setattr(check_worker, "_die_with_parent", lambda parent: time.sleep(3600))
    code, stdout, err = run("merge", a, b, "-o", tmp_path / "m2.safetensors", "--json")
    assert code == 0, err
    assert json.loads(stdout)["equivalence"] == first and first["ok"] is True


def test_a_fork_waits_for_ending_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a fork, the process's set of threads must stay the same over one gap: a thread
    still ending (its libraries' exit handlers hold locks) is waited for; a set that never
    settles is waited for at most ``most`` seconds."""
    seen = iter([["1", "2", "3"], ["1", "2"], ["1", "2"]])
    monkeypatch.setattr(check_worker.os, "listdir", lambda path: next(seen))
    check_worker.settle_threads(gap=0.0, most=10.0)
    assert next(seen, None) is None  # read three times: changed, then the same
    count = itertools.count()
    monkeypatch.setattr(check_worker.os, "listdir", lambda path: [str(next(count))])
    t0 = time.monotonic()
    check_worker.settle_threads(gap=0.001, most=0.05)
    assert 0.05 <= time.monotonic() - t0 < 5


def test_without_a_model_the_report_says_so(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    code, stdout, _ = run("merge", a, b, "-o", tmp_path / "m.safetensors", "--json")
    assert code == 0
    assert json.loads(stdout)["equivalence"] == {
        "ok": None,
        "reason": "not verified: no model (pass --model to verify)",
    }


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_a_wrong_spec_is_caught_and_nothing_is_written(
    trained_mlp_pair: tuple[Path, Path], tmp_path: Path, worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if worker == "thread":  # where the system does not fork, the check runs in a thread
        monkeypatch.setattr(check_worker, "forking", lambda: False)
    a, b = trained_mlp_pair
    spec = tmp_path / "wrong.yaml"  # moves net.0's units but forgets net.2's input columns
    spec.write_text(
        "format_version: 1\ngroups:\n  P_half: {size: 128, members: [[net.0.weight, 0], [net.0.bias, 0]]}\n"
    )
    out, permuted = tmp_path / "m", tmp_path / "p.safetensors"
    code, stdout, err = run("merge", a, b, "-o", out, "--save-permuted", permuted, "--spec", spec)
    assert code == 2 and stdout == ""
    line = err.splitlines()[0]
    assert line.startswith(f"error: {b}: pi(B) does not compute what B computes (max abs diff ")
    assert line.endswith("; the first group that breaks it: 'P_half'")
    assert sorted(tmp_path.iterdir()) == [spec]  # written beside the check, put in place never
    code, _, err = run("merge", a, b, "-o", out, "--spec", spec, "--no-verify")
    assert code == 0, err
    assert out.exists()


transformers = pytest.importorskip("transformers")


def _headless(kind: str) -> torch.nn.Module:
    t = transformers
    torch.manual_seed(0)
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    if kind == "bert":
        return t.BertModel(t.BertConfig(hidden_size=32, vocab_size=50, max_position_embeddings=16, **small))
    if kind == "llama":
        return t.LlamaModel(t.LlamaConfig(hidden_size=32, num_key_value_heads=2, vocab_size=50, **small))
    if kind == "gpt2":
        return t.GPT2Model(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16))
    return t.ViTModel(t.ViTConfig(hidden_size=32, image_size=8, patch_size=4, num_channels=3, **small))


def _hidden(cls: type, path: Path, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = (
        {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
        if kind == "vit"
        else {"input_ids": torch.randint(0, 50, (2, 8), generator=g)}
    )
    with torch.no_grad():
        return cls.from_pretrained(path).eval()(**x).last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2", "vit"])
def test_headless_models_keep_their_output(kind: str, tmp_path: Path) -> None:
    model = _headless(kind)
    a = tmp_path / "a"
    model.save_pretrained(a)
    out = tmp_path / "p"
    code, stdout, err = run("permute", a, "-o", out, "--seed", "3", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["equivalence"]["ok"] is True
    assert rep["notes"] == [f"kept group 'residual' fixed: the model's output axis (a headless {kind} model)"]
    assert rep["kept"] == {"residual": f"the model's output axis (a headless {kind} model)"}
    cls = type(model)
    torch.testing.assert_close(_hidden(cls, out, kind), _hidden(cls, a, kind), atol=1e-5, rtol=1e-5)
    # a merge aligns the residual stream too, and says that its output follows A's coordinates
    b = tmp_path / "b"
    torch.manual_seed(1)
    type(model)(model.config).save_pretrained(b)
    code, stdout, err = run("merge", a, b, "-o", tmp_path / "m", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["equivalence"]["ok"] is True and rep["equivalence"]["output_group"] == "residual"
    assert "answers in A's coordinates" in rep["notes"][0]
    assert load_file(tmp_path / "m" / "model.safetensors")


def test_the_family_keeps_a_headless_output_when_nothing_is_verified(tmp_path: Path) -> None:
    """With --no-verify the check cannot find the output axis: the family decides it (a config
    naming a base model class), so the permuted model still answers what the original does."""
    model = _headless("bert")
    a = tmp_path / "a"
    model.save_pretrained(a)
    out = tmp_path / "p"
    code, stdout, err = run("permute", a, "-o", out, "--seed", "3", "--no-verify", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["equivalence"] == {"ok": None, "reason": "not verified: --no-verify"}
    assert "residual" in rep["kept"]
    cls = type(model)
    torch.testing.assert_close(_hidden(cls, out, "bert"), _hidden(cls, a, "bert"), atol=1e-5, rtol=1e-5)


def _with_position_ids(folder: Path) -> None:
    """Store the buffer older transformers saved (``embeddings.position_ids``, int64), as the
    published all-MiniLM-L6-v2 file does."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    state = load_file(f)
    n = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    state["embeddings.position_ids"] = torch.arange(n).unsqueeze(0)
    save_file(state, str(f), metadata={"format": "pt"})


def test_a_stored_position_ids_buffer_is_tolerated(tmp_path: Path) -> None:
    """A headless BERT whose file stores position_ids (as old transformers saved it) is
    verified, keeps its output under permute, and loads with its own library."""
    model = _headless("bert")
    a = tmp_path / "a"
    model.save_pretrained(a)
    _with_position_ids(a)
    out = tmp_path / "p"
    code, stdout, err = run("permute", a, "-o", out, "--seed", "3", "--json")
    assert code == 0, err
    assert json.loads(stdout)["equivalence"]["ok"] is True
    cls = type(model)
    torch.testing.assert_close(_hidden(cls, out, "bert"), _hidden(cls, a, "bert"), atol=1e-5, rtol=1e-5)


def test_a_model_that_does_not_fit_is_an_error_and_nothing_is_written(tmp_path: Path) -> None:
    """A model that can be built (config.json) but does not fit the checkpoint for a reason no
    library tolerates is an error, not a quiet "not verified"."""
    model = _headless("bert")
    a = tmp_path / "a"
    model.save_pretrained(a)
    cfg = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**cfg, "type_vocab_size": cfg.get("type_vocab_size", 2) + 1}))
    out = tmp_path / "p"
    code, stdout, err = run("permute", a, "-o", out, "--seed", "3")
    assert code == 2 and stdout == ""
    assert "does not fit the checkpoint" in err.splitlines()[0]
    assert "--no-verify" in err.splitlines()[1]
    assert not out.exists()
    assert run("permute", a, "-o", out, "--seed", "3", "--no-verify")[0] == 0


@pytest.mark.parametrize("order", ["base-first", "fine-tune-first"])
def test_a_fine_tune_merges_with_its_base_that_stores_a_buffer(order: str, tmp_path: Path) -> None:
    """The base stores position_ids (old transformers), the fine-tune re-saved by a current one
    does not: they merge in both orders, the output has A's tensors, and the report says what
    was taken or dropped. A float parameter on one side only stays an error."""
    from safetensors.torch import load_file, save_file

    model = _headless("bert")
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    model.save_pretrained(base)
    _with_position_ids(base)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    model.save_pretrained(tuned)
    a, b = (base, tuned) if order == "base-first" else (tuned, base)
    out = tmp_path / "m"
    code, stdout, err = run("merge", a, b, "-o", out, "--method", "weight", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["equivalence"]["ok"] is True
    word = "lacks buffers A has, taken from A" if order == "base-first" else "has buffers A lacks, dropped"
    assert any(word in n and "embeddings.position_ids" in n for n in rep["notes"])
    assert set(load_file(out / "model.safetensors")) == set(load_file(a / "model.safetensors"))
    # a float parameter missing on one side is still an error that names it
    state = load_file(tuned / "model.safetensors")
    del state["pooler.dense.bias"]
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run("merge", base, tuned, "-o", tmp_path / "m2", "--method", "weight")
    assert code == 2
    assert err.splitlines()[0] == f"error: {tuned}: tensors missing that A has: 'pooler.dense.bias'"


def test_a_family_that_needs_a_config_says_so(tmp_path: Path) -> None:
    """BERT's attention heads come from config.json: weights without one are an error with a
    hint, unless --config names one or --freeze keeps attention fixed."""
    import shutil

    model = _headless("bert")
    model.save_pretrained(tmp_path / "m")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shutil.copy(tmp_path / "m" / "model.safetensors", a)
    shutil.copy(tmp_path / "m" / "model.safetensors", b)
    out = tmp_path / "o.safetensors"
    code, stdout, err = run("merge", a, b, "-o", out, "--method", "weight")
    assert code == 2 and stdout == ""
    assert err.splitlines() == [
        f"error: {a}: bert attention heads come from config.json, which the checkpoint lacks",
        "hint: copy the model's config.json next to the weights or pass --config FILE; to keep "
        "attention fixed instead, pass --freeze 'layers.*.attn.*'",
    ]
    assert not out.exists()
    code, stdout, err = run(
        "merge", a, b, "-o", out, "--method", "weight", "--config", tmp_path / "m" / "config.json", "--json"
    )
    assert code == 0, err
    assert "layers.0.attn.qk" in json.loads(stdout)["match"]["groups"]
    assert json.loads(stdout)["equivalence"]["ok"] is True
    code, _, err = run(
        "merge", a, b, "-o", out, "--force", "--method", "weight", "--freeze", "layers.*.attn.*"
    )
    assert code == 0, err
