"""Hugging Face transformers from checkpoints alone: GPT-2, LLaMA (GQA and MHA, rotary), BERT, ViT.

Tiny random models are built from configs (nothing downloaded) and saved with ``save_pretrained``;
rebasin reads the directories, and its outputs are loaded back with ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import expect_error, run, tiny, train_seed
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

KINDS = ("gpt2", "llama", "llama-mha", "bert", "roberta", "vit")


def logits(kind: str, path: Path) -> torch.Tensor:
    cls = type(tiny(kind, 0))
    model = cls.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(0)
    if kind == "vit":
        inputs = {"pixel_values": torch.randn(3, 3, 8, 8, generator=g)}
    else:
        inputs = {"input_ids": torch.randint(0, 50, (3, 12), generator=g)}
    with torch.no_grad():
        return model(**inputs).logits


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in KINDS:
        pair = []
        for seed in (0, 1):
            d = root / f"{kind}-{seed}"
            tiny(kind, seed).save_pretrained(d)
            pair.append(d)
        out[kind] = (pair[0], pair[1])
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_permute_preserves_logits_and_loads_with_from_pretrained(
    kind: str, hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    a, _ = hf_dirs[kind]
    out = tmp_path / "perm"
    code, stdout, err = run("permute", a, "-o", out, "--seed", "5", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    moved = rep["moved_fraction"]
    assert moved["residual"] > 0.5 and moved["layers.0.mlp"] > 0.5
    assert any(v > 0 for g, v in moved.items() if ".attn." in g)  # heads really moved
    assert (out / "config.json").read_text() == (a / "config.json").read_text()
    before, after = logits(kind, a), logits(kind, out)
    assert torch.allclose(before, after, atol=1e-4), float((before - after).abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_merge_with_own_permutation_gives_back_a(
    kind: str, hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    a, _ = hf_dirs[kind]
    perm = tmp_path / "perm"
    assert run("permute", a, "-o", perm, "--seed", "9", "--quiet")[0] == 0
    merged = tmp_path / "merged"
    code, _, err = run("merge", a, perm, "-o", merged, "--quiet")
    assert code == 0, err
    ta, tm = tensors(a), tensors(merged)
    assert set(ta) == set(tm)  # tied weights stay stored once
    for k in ta:
        assert torch.allclose(ta[k], tm[k], atol=1e-6), k


@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_mean_of_a_and_permuted_b(
    kind: str, hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    a, b = hf_dirs[kind]
    merged, pb = tmp_path / "merged", tmp_path / "pb"
    code, _, err = run("merge", a, b, "-o", merged, "--save-permuted", pb, "--quiet")
    assert code == 0, err
    ta, tb, tm = tensors(a), tensors(pb), tensors(merged)
    for k in ta:
        assert torch.allclose(tm[k], 0.5 * (ta[k] + tb[k]), atol=1e-6), k
    # pi(B) is B, reordered: same function
    assert torch.allclose(logits(kind, b), logits(kind, pb), atol=1e-4)
    # and the merged directory is a loadable model
    assert logits(kind, merged).isfinite().all()


def test_gpt2_tied_head_is_written_once(hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    a, _ = hf_dirs["gpt2"]
    state = dict(tensors(a))
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # a state dict with both
    d = tmp_path / "both"
    d.mkdir()
    torch.save(state, d / "pytorch_model.bin")
    (d / "config.json").write_text((a / "config.json").read_text())
    out = tmp_path / "out"
    code, _, err = run("permute", d, "-o", out, "--quiet")
    assert code == 0, err
    assert "lm_head.weight" not in tensors(out)
    assert torch.allclose(logits("gpt2", a), logits("gpt2", out), atol=1e-4)


def test_without_config_attention_stays_fixed_and_says_so(
    hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    a, _ = hf_dirs["gpt2"]
    bare = tmp_path / "gpt2.safetensors"
    bare.write_bytes((a / "model.safetensors").read_bytes())
    code, stdout, err = run("spec", bare, "--json")
    assert code == 0, err
    spec = json.loads(stdout)
    assert not any("attn" in g for g in spec["groups"])
    assert spec["notes"] == [
        "attention stays fixed: the head count is unknown (put the model's config.json next to the weights)"
    ]


def test_freeze_keeps_groups_fixed_and_reports_it(
    hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    a, b = hf_dirs["llama"]
    code, stdout, err = run("merge", a, b, "-o", tmp_path / "m", "--freeze", "residual", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["spec"]["frozen"] == ["residual"]
    assert "residual" not in rep["spec"]["groups"]
    assert "residual" not in rep["match"]["groups"]
    pb = tmp_path / "pb"
    run("merge", a, b, "-o", tmp_path / "m2", "--freeze", "residual", "--save-permuted", pb, "--quiet")
    assert torch.equal(tensors(pb)["model.norm.weight"], tensors(b)["model.norm.weight"])


def test_freeze_pattern_matching_nothing_is_an_error(
    hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    a, b = hf_dirs["llama"]
    expect_error(
        ["merge", a, b, "-o", tmp_path / "m", "--freeze", "resid"],
        "--freeze 'resid' matches no group (groups: residual, layers.0.attn.q, layers.0.attn.kv, "
        "layers.0.mlp, ...)",
    )


def test_spec_file_round_trip_keeps_segments_and_heads(
    hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    from rebasin.checkpoint import load_checkpoint
    from rebasin.spec import infer_spec, load_spec

    a, _ = hf_dirs["gpt2"]
    f = tmp_path / "gpt2.yaml"
    assert run("spec", a, "-o", f, "--quiet")[0] == 0
    ck = load_checkpoint(a)
    assert load_spec(f) == infer_spec(ck.shapes, config=ck.config)
    out = tmp_path / "perm"
    assert run("permute", a, "-o", out, "--spec", f, "--seed", "2", "--quiet")[0] == 0
    assert torch.allclose(logits("gpt2", a), logits("gpt2", out), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_tracing_a_transformers_model_agrees_with_the_name_based_spec(kind: str) -> None:
    """The tracer follows Hugging Face code: every group it finds is a name-based group, with the
    same head structure; it finds the heads too, except under grouped-query attention, whose
    repeated kv heads it leaves fixed."""
    from rebasin.permutation import permute, random_permutation
    from rebasin.spec import infer_spec
    from rebasin.spec.trace import trace_spec

    model = tiny(kind, 0).eval()
    x = torch.randn(2, 3, 8, 8) if kind == "vit" else torch.randint(0, 50, (2, 10))
    traced = trace_spec(model, (x,), name=kind)
    named = infer_spec(model.state_dict(), config=model.config.to_dict())
    named_by_members = {frozenset(ms): g for g, ms in named.groups.items()}
    for g, ms in traced.groups.items():
        assert frozenset(ms) in named_by_members, g
        h = named.heads.get(named_by_members[frozenset(ms)])
        assert (traced.heads[g].count if g in traced.heads else None) == (h.count if h else None), g
    expected = len(named.sizes) if kind != "llama" else 3  # GQA: residual + MLPs only
    assert len(traced.sizes) == expected, sorted(traced.sizes)
    other = type(model)(model.config).eval()
    other.load_state_dict(dict(permute(model.state_dict(), traced, random_permutation(traced, 1))))
    key = "pixel_values" if kind == "vit" else "input_ids"
    with torch.no_grad():
        assert torch.allclose(model(**{key: x}).logits, other(**{key: x}).logits, atol=1e-4)


def markov_tokens(n: int, seed: int, vocab: int = 50, length: int = 16) -> torch.Tensor:
    """A sparse random Markov language: every token has 3 likely successors."""
    succ = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, length):
        x[:, t] = succ[x[:, t - 1], torch.randint(0, 3, (n,), generator=g)]
    return x


@pytest.fixture(scope="module")
def trained_lms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    import numpy as np

    root = tmp_path_factory.mktemp("lm")
    out = []
    for i in (0, 1):
        seed = train_seed(i)
        model = tiny("gpt2", seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data = markov_tokens(2048, seed)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(60):
            batch = data[torch.randint(0, len(data), (32,), generator=g)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(root / f"lm{i}")
        out.append(root / f"lm{i}")
    tokens = root / "tokens.npz"
    np.savez(tokens, input_ids=markov_tokens(400, 5).numpy(), input_ids_test=markov_tokens(200, 6).numpy())
    return out[0], out[1], tokens


def _own_lm_loss(folder: Path, tokens: Path) -> float:
    """The next-token loss transformers itself gives on the test ids (the mean over tokens)."""
    import numpy as np
    import transformers

    ids = torch.from_numpy(np.load(tokens)["input_ids_test"])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _check_lm_paths(paths: dict, a: Path, b: Path, tokens: Path) -> None:
    """Guarantees of a language-model barrier: both paths start at A's own loss and end at B's
    (pi(B) computes what B computes), as transformers computes them; barriers are never negative.
    How far alignment lowers the barrier is a figure (benchmarks/bench_trained_pairs.py)."""
    own_a, own_b = _own_lm_loss(a, tokens), _own_lm_loss(b, tokens)
    for name in ("naive", "aligned"):
        test = paths[name]["loss"]["test"]
        assert test[0] == pytest.approx(own_a, rel=1e-5), name
        assert test[-1] == pytest.approx(own_b, rel=1e-5), name
        assert paths[name]["barriers"]["test"]["loss"]["linear"] >= 0.0


def test_barrier_of_language_models_on_token_data(trained_lms: tuple[Path, Path, Path]) -> None:
    a, b, tokens = trained_lms
    code, stdout, err = run("barrier", a, b, "--data", tokens, "--alphas", "5", "--budget", "1", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    ev = rep["evaluation"]
    assert ev["model"]["name"] == "hf:GPT2LMHeadModel"
    assert ev["data"]["num_classes"] == 50
    m = rep["match"]  # auto: never worse than B as it is on its own criterion
    assert m["direction"] == "min" and m["objective"] <= m["objective_identity"] + 1e-9
    _check_lm_paths(ev["paths"], a, b, tokens)


def test_activation_matching_weight_matches_groups_it_cannot_tap(
    trained_lms: tuple[Path, Path, Path],
) -> None:
    a, b, tokens = trained_lms
    code, stdout, err = run(
        "barrier", a, b, "--data", tokens, "--alphas", "3", "--method", "activation", "--json"
    )
    assert code == 0, err
    rep = json.loads(stdout)
    assert "layers.0.attn.qk" in rep["match"]["options"]["weight_matched"]
    assert "residual" not in rep["match"]["options"]["weight_matched"]  # tapped at every LayerNorm
    _check_lm_paths(rep["evaluation"]["paths"], a, b, tokens)


def test_token_data_must_be_integer_ids(trained_lms: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import numpy as np

    a, b, _ = trained_lms
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=np.zeros((4, 8, 2), dtype=np.int64))
    expect_error(
        ["barrier", a, b, "--data", bad],
        f"{bad}: 'input_ids' must be integer token ids of shape (sequences, tokens), got (4, 8, 2) int64",
    )


def test_token_data_on_a_headless_model_says_what_the_barrier_needs(
    tmp_path: Path, trained_lms: tuple[Path, Path, Path]
) -> None:
    import transformers as t

    torch.manual_seed(0)
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    for seed in (0, 1):
        t.BertModel(
            t.BertConfig(hidden_size=32, vocab_size=50, max_position_embeddings=16, **small)
        ).save_pretrained(tmp_path / f"e{seed}")
    code, stdout, err = run("barrier", tmp_path / "e0", tmp_path / "e1", "--data", trained_lms[2])
    assert code == 2 and stdout == ""
    assert err.splitlines()[0] == (
        f"error: {tmp_path / 'e0'}: BertModel has no task head, so it has no loss to measure a barrier "
        "with: the barrier needs the model with its head (config.json architectures ...ForMaskedLM, "
        "...ForSequenceClassification, ...) and data for that task"
    )


def test_merge_many_of_transformers_with_freeze(
    hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    a, b = hf_dirs["gpt2"]
    perm = tmp_path / "perm"
    assert run("permute", a, "-o", perm, "--seed", "4", "--quiet")[0] == 0
    out = tmp_path / "many"
    code, stdout, err = run("merge-many", a, b, perm, "-o", out, "--freeze", "residual", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["spec"]["frozen"] == ["residual"]
    assert "residual" not in rep["merge_many"]["moved_fraction"][0]
    assert logits("gpt2", out).isfinite().all()  # a loadable directory


def test_barrier_of_an_image_transformer_on_image_data(
    hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    import numpy as np

    a, b = hf_dirs["vit"]
    g = np.random.default_rng(0)
    data = tmp_path / "images.npz"
    np.savez(data, x=g.standard_normal((40, 3, 8, 8)).astype(np.float32), y=g.integers(0, 5, 40))
    code, stdout, err = run("barrier", a, b, "--data", data, "--alphas", "3", "--budget", "1", "--json")
    assert code == 0, err
    ev = json.loads(stdout)["evaluation"]
    assert ev["model"]["name"] == "hf:ViTForImageClassification"
    # B aligned to A computes what B computes: the aligned path ends where the naive one does
    assert ev["paths"]["aligned"]["loss"]["test"][-1] == pytest.approx(
        ev["paths"]["naive"]["loss"]["test"][-1], abs=1e-4
    )


@pytest.mark.parametrize("kind", ["gpt2", "vit"])
def test_spec_trace_on_a_model_directory(
    kind: str, hf_dirs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """--spec trace builds the class config.json names, traces it, and speaks checkpoint names
    (ViT's saved names differ from its modules'; GPT-2's tied head is stored once)."""
    a, _ = hf_dirs[kind]
    code, stdout, err = run("spec", a, "--spec", "trace", "--json")
    assert code == 0, err
    traced = json.loads(stdout)
    named = json.loads(run("spec", a, "--json")[1])
    assert traced["source"].startswith("traced:hf:")
    assert len(traced["groups"]) == len(named["groups"])
    out = tmp_path / "perm"
    assert run("permute", a, "-o", out, "--spec", "trace", "--seed", "6", "--quiet")[0] == 0
    assert torch.allclose(logits(kind, a), logits(kind, out), atol=1e-4)
