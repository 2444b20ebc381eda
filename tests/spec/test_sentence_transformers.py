"""A sentence-transformers folder in gives a folder out that SentenceTransformer(path) loads, with
the same embeddings after ``permute`` (its BERT is headless: the residual stream stays put)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run

st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")


def _modules() -> object:
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:  # older releases
        from sentence_transformers import models as modules
    return modules


def _tiny_st(d: Path) -> Path:
    import torch

    torch.manual_seed(0)
    bert = d / "bert"
    bert.mkdir()
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "hello",
        "world",
        "merge",
        *[f"w{i}" for i in range(40)],
    ]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(bert / "vocab.txt"))
    cfg = transformers.BertConfig(
        hidden_size=32, vocab_size=len(vocab), max_position_embeddings=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48,
    )  # fmt: skip
    transformers.BertModel(cfg).save_pretrained(bert)
    tok.save_pretrained(bert)
    m = _modules()
    word = m.Transformer(str(bert), max_seq_length=16)  # type: ignore[attr-defined]
    dim = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
    model = st.SentenceTransformer(modules=[word, m.Pooling(dim(), pooling_mode="mean"), m.Normalize()])  # type: ignore[attr-defined]
    out = d / "st-a"
    model.save(str(out))
    return out


def test_sentence_transformers_folder_round_trip(tmp_path: Path) -> None:
    a = _tiny_st(tmp_path)
    out = tmp_path / "st-p"
    code, stdout, err = run("permute", a, "-o", out, "--seed", "1", "--json")
    assert code == 0, err
    assert json.loads(stdout)["equivalence"]["ok"] is True
    for name in ("modules.json", "1_Pooling/config.json", "2_Normalize", "tokenizer.json"):
        assert (out / name).exists(), name
        assert (out / name).stat().st_mode == (a / name).stat().st_mode
    texts = ["hello world", "merge w3 w4 w5"]
    ea = st.SentenceTransformer(str(a)).encode(texts)
    ep = st.SentenceTransformer(str(out)).encode(texts)
    assert abs(ea - ep).max() < 1e-5
