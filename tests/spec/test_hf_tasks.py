"""Barriers for every common Hugging Face task head, on tiny models built from configs and tiny
data files with the documented keys: the aligned path is computed, and each endpoint's loss is
the model's own loss as transformers computes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import run

t = pytest.importorskip("transformers")

SMALL = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48, "hidden_size": 32}


def _bert(cls: Any, seed: int, **kw: Any) -> Any:
    torch.manual_seed(seed)
    return cls(t.BertConfig(vocab_size=50, max_position_embeddings=16, mask_token_id=3, **SMALL, **kw))


def _tokens(g: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    ids = g.integers(4, 50, (n, 12))
    mask = np.ones_like(ids)
    mask[: n // 2, 9:] = 0  # padded tail on half the rows
    return {"input_ids": ids, "attention_mask": mask}


def _data(kind: str, path: Path) -> None:
    g = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for suffix, n in (("", 24), ("_test", 16)):
        if kind == "image":
            arrays["pixel_values" + suffix] = g.standard_normal((n, 3, 8, 8)).astype(np.float32)
            arrays["labels" + suffix] = g.integers(0, 5, n)
            continue
        tok = _tokens(g, n)
        arrays |= {k + suffix: v for k, v in tok.items()}
        if kind == "sequence":
            arrays["labels" + suffix] = g.integers(0, 3, n)
        elif kind == "token":
            labels = g.integers(0, 4, tok["input_ids"].shape)
            labels[tok["attention_mask"] == 0] = -100
            arrays["labels" + suffix] = labels
    np.savez(path, **arrays)


MODELS = {
    "masked": lambda s: _bert(t.BertForMaskedLM, s),
    "sequence": lambda s: _bert(t.BertForSequenceClassification, s, num_labels=3),
    "token": lambda s: _bert(t.BertForTokenClassification, s, num_labels=4),
    "image": lambda s: (
        torch.manual_seed(s),
        t.ViTForImageClassification(
            t.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=5, **SMALL)
        ),
    )[1],
}


def _own_loss(folder: Path, kind: str, data: Path) -> float:
    """The test loss transformers computes itself (masked LM: on the masked test data rebasin
    measured, from the same seeded masking)."""
    model = type(MODELS[kind](0)).from_pretrained(folder).eval()
    z = dict(np.load(data))
    with torch.no_grad():
        if kind == "image":
            return float(
                model(
                    pixel_values=torch.from_numpy(z["pixel_values_test"]),
                    labels=torch.from_numpy(z["labels_test"]),
                ).loss
            )
        ids, mask = torch.from_numpy(z["input_ids_test"]), torch.from_numpy(z["attention_mask_test"])
        if kind == "masked":
            from rebasin.checkpoint import load_checkpoint
            from rebasin.data import load_data
            from rebasin.evaluate.setup import for_head
            from rebasin.models.resolve import choose_model

            ck = load_checkpoint(folder)
            ref = choose_model(None, None, ck.metadata, ck.name, ck.config).need()
            d = for_head(load_data(str(data), 0), ck, ref, 0)
            x, labels = d.x_test, d.y_test
            ids, mask = x[..., 0], x[..., 1]
        else:
            labels = torch.from_numpy(z["labels_test"])
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("kind", list(MODELS))
def test_barrier_per_task_head(kind: str, tmp_path: Path) -> None:
    folders = []
    for seed in (0, 1):
        folders.append(tmp_path / f"m{seed}")
        MODELS[kind](seed).save_pretrained(folders[-1])
    data = tmp_path / "data.npz"
    _data(kind, data)
    code, stdout, err = run(
        "barrier", *folders, "--data", data, "--alphas", "3", "--method", "weight", "--json"
    )
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["equivalence"]["ok"] is True
    paths = rep["evaluation"]["paths"]
    assert set(paths) == {"naive", "aligned"}
    for path in paths.values():
        assert path["loss"]["test"][0] == pytest.approx(_own_loss(folders[0], kind, data), rel=1e-4)
        assert path["loss"]["test"][-1] == pytest.approx(_own_loss(folders[1], kind, data), rel=1e-4)


def test_data_costs_run_on_a_classifier(tmp_path: Path) -> None:
    """STE and Sinkhorn's data cost run on sequence-classification data, never worse than B as
    it is on the midpoint loss they report."""
    folders = []
    for seed in (0, 1):
        folders.append(tmp_path / f"m{seed}")
        MODELS["sequence"](seed).save_pretrained(folders[-1])
    data = tmp_path / "data.npz"
    _data("sequence", data)
    for method in (["ste", "--steps", "3"], ["sinkhorn", "--cost", "mid", "--steps", "3"]):
        code, stdout, err = run(
            "barrier", *folders, "--data", data, "--alphas", "2", "--method", *method, "--json"
        )
        assert code == 0, err
        m = json.loads(stdout)["match"]
        assert m["objective"] <= m["objective_identity"] + 1e-9


def test_masking_is_seeded_and_touches_only_real_tokens(tmp_path: Path) -> None:
    from rebasin.data.core import Dataset
    from rebasin.evaluate.metrics import IGNORED
    from rebasin.evaluate.setup import _masked

    g = np.random.default_rng(0)
    tok = _tokens(g, 200)
    x = torch.stack([torch.from_numpy(tok["input_ids"]), torch.from_numpy(tok["attention_mask"])], -1)
    d = Dataset("d", x, x[..., 0], x, x[..., 0], 50, task="lm", inputs="input_ids")
    m1, m2 = _masked(d, 3, seed=5), _masked(d, 3, seed=5)
    assert torch.equal(m1.x_train, m2.x_train) and torch.equal(m1.y_train, m2.y_train)
    chosen = m1.y_train != IGNORED
    assert not bool((chosen & (x[..., 1] == 0)).any())  # never a padded position
    assert bool((m1.x_train[..., 0][chosen] == 3).all())
    assert torch.equal(m1.y_train[chosen], x[..., 0][chosen])
    assert 0.10 < float(chosen.float().sum() / (x[..., 1] > 0).sum()) < 0.20


@pytest.mark.parametrize(
    ("arrays", "line"),
    [
        (
            {"input_ids": np.zeros((4, 8), np.int64), "labels": np.zeros((4, 1), np.int64)},
            "'labels' (4, 1) must be (4,) or (4, 8) for 'input_ids' (4, 8)",
        ),
        (
            {"input_ids": np.zeros((4, 8), np.int64), "labels": np.zeros(4, np.uint64)},
            "'labels' must be integer labels of shape (examples,) or (sequences, tokens), got (4,) uint64",
        ),
        (
            {"pixel_values": np.zeros((4, 3, 8, 8), np.float32)},
            "'pixel_values' needs 'labels' (one class per image)",
        ),
    ],
)
def test_bad_task_data_is_one_line(arrays: dict[str, np.ndarray], line: str, tmp_path: Path) -> None:
    from rebasin.core.errors import ConfigError
    from rebasin.data import load_data

    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError) as e:
        load_data(str(path))
    assert e.value.message == line
