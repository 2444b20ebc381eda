"""Writing results: output metadata and checkpoints written like their input (Hugging Face
folders keep their config and tokenizer files; tied heads are stored once)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from rebasin._version import __version__
from rebasin.checkpoint import Checkpoint, LazyStateDict, copy_model_files, save_checkpoint
from rebasin.checkpoint.atomic import file_mode
from rebasin.checkpoint.state import info_of
from rebasin.core.errors import ConfigError
from rebasin.core.types import Progress
from rebasin.models.resolve import trusted_records

PathLike = str | os.PathLike[str]


def output_metadata(base: dict[str, str], **items: Any) -> dict[str, str]:
    """An output's metadata: the input's own keys, its trusted architecture and data records
    (built-in names only: a refused record never spreads), and this run's provenance."""
    out = {k: v for k, v in base.items() if not k.startswith("rebasin.")} | trusted_records(base)
    out.setdefault("format", "pt")  # what Hugging Face loaders expect of a PyTorch safetensors file
    out["rebasin.version"] = __version__
    out.update({f"rebasin.{k}": str(v) for k, v in items.items() if v is not None})
    return out


def write_checkpoint(
    state: Any,
    out: PathLike,
    meta: dict[str, str],
    like: Checkpoint,
    shard: int | None,
    progress: Callable[[int, int], None] | None = None,
    gate: Callable[[], object] | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``state`` like the input ``like``: into a directory, a Hugging Face input's
    config, tokenizer and other non-weight files come along, so ``from_pretrained`` loads it
    (``config``: the output's own config.json instead of the input's).
    ``gate()`` runs before the output is put in place (see ``save_checkpoint``)."""
    if like.config is not None:
        state = _untie(state, like)
    src = like.model_dir
    if config is not None and (src is None or Path(out).suffix):
        raise ConfigError(
            "the output's config.json changes (its widths): write it to a folder",
            "pass -o DIR",
            source=str(out),
        )

    def extra(staged: Path) -> list[str]:
        assert src is not None
        names = copy_model_files(src, staged)
        if config is not None:
            (staged / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            os.chmod(staged / "config.json", file_mode())
            names = sorted({*names, "config.json"})
        return names

    files = extra if src is not None else None
    return save_checkpoint(state, out, meta, shard_size=shard, progress=progress, extra=files, gate=gate)


_TIED = (
    ("lm_head.weight", ("embed_tokens.weight", "wte.weight")),
    ("cls.predictions.decoder.weight", ("word_embeddings.weight",)),
)


def _untie(state: Any, like: Checkpoint) -> Any:
    """Drop an output head tied to the input embedding (config ``tie_word_embeddings``): Hugging
    Face stores tied weights once and re-ties them on load."""
    assert like.config is not None
    if like.config.get("tie_word_embeddings", True) is False:
        return state
    drop = []
    for head, embeds in _TIED:
        emb = [k for k in state if k.endswith(embeds) and k != head]
        if head in state and len(emb) == 1 and torch.equal(like.state[head], like.state[emb[0]]):
            drop.append(head)
    if not drop:
        return state
    return LazyStateDict([k for k in state if k not in drop], lambda k: state[k], info_of(state))


def sub_progress(progress: Progress | None, desc: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(desc, done, total)
