"""Helpers shared by the tests: running the command line, checking one-line errors, tiny models."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from rebasin.cli import app

runner = CliRunner()

TRAIN_SEED_SHIFT = int(os.environ.get("REBASIN_TEST_SEED", "0"))
"""Added (x10) to the seeds of the models trained for the tests: benchmarks/bench_test_stability.py
sets it to show how a test fares with other trained pairs."""


def train_seed(seed: int) -> int:
    """The seed a test fixture trains with (see TRAIN_SEED_SHIFT)."""
    return seed + 10 * TRAIN_SEED_SHIFT


def run(*args: str | Path) -> tuple[int, str, str]:
    r = runner.invoke(app, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def no_leftovers(directory: Path, *names: str) -> None:
    for n in names:
        assert not (directory / n).exists(), n
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".rebasin-")]


def expect_error(args: list[str | Path], line: str, hint: str | None = None) -> None:
    code, stdout, stderr = run(*args)
    assert code == 2, stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert lines[0] == f"error: {line}"
    if hint is not None:
        assert lines[1] == f"hint: {hint}"


def same_figure(got: float | None, want: float | None, rel: float = 1e-6) -> bool:
    """Whether two reported figures agree: None only with None, NaN only with NaN, infinities
    exactly, finite numbers within ``rel`` (explicit: ``pytest.approx`` treats None and NaN
    differently from one pytest release to the next)."""
    if got is None or want is None:
        return got is None and want is None
    if math.isnan(got) or math.isnan(want):
        return math.isnan(got) and math.isnan(want)
    if math.isinf(got) or math.isinf(want):
        return got == want
    return abs(got - want) <= rel * max(abs(got), abs(want)) or got == want


def tiny(kind: str, seed: int) -> Any:
    """A tiny random model of one family (4 heads of 8 dims; LLaMA: 2 kv heads)."""
    import transformers as t

    torch.manual_seed(seed)
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    if kind == "gpt2":
        cfg = t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16)
        return t.GPT2LMHeadModel(cfg)
    if kind.startswith("llama"):
        kv = 4 if kind == "llama-mha" else 2
        cfg = t.LlamaConfig(hidden_size=32, num_key_value_heads=kv, vocab_size=50, **small)
        return t.LlamaForCausalLM(cfg)
    if kind == "bert":
        return t.BertForMaskedLM(
            t.BertConfig(hidden_size=32, vocab_size=50, max_position_embeddings=16, **small)
        )
    if kind == "roberta":
        cfg = t.RobertaConfig(hidden_size=32, vocab_size=50, max_position_embeddings=20, **small)
        return t.RobertaForMaskedLM(cfg)
    cfg = t.ViTConfig(hidden_size=32, image_size=8, patch_size=4, num_channels=3, num_labels=5, **small)
    return t.ViTForImageClassification(cfg)
