"""Spec resolution: which permutation groups a checkpoint has (inferred, traced, a family, a file),
and which of them are frozen."""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rebasin.checkpoint import Checkpoint
from rebasin.core.errors import ConfigError, SpecError
from rebasin.data import load_data
from rebasin.models.fit import check_fits, renamed
from rebasin.models.resolve import ARCH_KEY, ARGS_KEY, ModelChoice
from rebasin.models.transformer import Transformer
from rebasin.spec.core import PermutationSpec, load_spec
from rebasin.spec.names import infer_spec
from rebasin.spec.registry import list_specs
from rebasin.spec.trace import trace_spec

ATTENTION = "layers.0.attn.qk"
"""The name of the first attention group, as a family whose heads come from config.json names it."""


def check_config(spec: PermutationSpec, ck: Checkpoint, patterns: Sequence[str]) -> list[str]:
    """A family whose attention heads come from ``config.json``, given without one, is an error
    unless ``--freeze`` keeps the attention groups fixed; returns the freeze patterns left for
    the groups the spec has."""
    attention = [p for p in patterns if fnmatch.fnmatchcase(ATTENTION, p)]
    if spec.needs_config and not attention:
        raise ConfigError(
            f"{spec.family} attention heads come from config.json, which the checkpoint lacks",
            "copy the model's config.json next to the weights or pass --config FILE; to keep "
            "attention fixed instead, pass --freeze 'layers.*.attn.*'",
            source=ck.name,
        )
    if not spec.needs_config:
        return list(patterns)
    return [p for p in patterns if p not in attention or any(fnmatch.fnmatchcase(g, p) for g in spec.sizes)]


def freeze_groups(spec: PermutationSpec, patterns: Sequence[str]) -> tuple[PermutationSpec, list[str]]:
    """Hold the groups matching any glob pattern (``residual``, ``layers.*.attn.*``) at identity."""
    frozen: list[str] = []
    for pat in patterns:
        hit = [g for g in spec.sizes if fnmatch.fnmatchcase(g, pat)]
        if not hit:
            names = list(spec.sizes)
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ConfigError(f"--freeze '{pat}' matches no group (groups: {shown})")
        frozen += [g for g in hit if g not in frozen]
    if not frozen:
        return spec, []
    out = spec.without(frozen)
    if not out.sizes:
        raise ConfigError("--freeze leaves no group free to move; nothing to align")
    return out, frozen


def traced_spec(ck: Checkpoint, model: ModelChoice, data: str | None = None) -> tuple[PermutationSpec, str]:
    """Build the run's model, check that it fits the checkpoint, and trace it for its spec (on
    ``data`` where the model has no example input)."""

    ref = model.need()
    m = ref.factory()()
    # checkpoint names -> the model's own, where they differ
    check_fits(m, renamed(m, ck.shapes), ck.name, ref.name, made="made")
    inputs = None
    if getattr(m, "example_input", None) is None and data:
        inputs = (load_data(data).x_train[:2],)
    s = trace_spec(m, inputs, name=ref.name)
    back = {v: k for k, v in getattr(m, "rebasin_key_map", {}).items()}
    s = s.renamed(back).restricted(ck.shapes)  # checkpoint names; tied aliases it stores once
    problems = s.problems(ck.shapes)
    if problems:  # cannot happen when the model fits; kept as a guard
        raise SpecError(problems, source=ck.name)
    return s, f"traced:{ref.name}"


def spec_config(ck: Checkpoint) -> dict[str, Any] | None:
    """What name-based inference may know beyond shapes: a Hugging Face config.json, or the head
    count of rebasin's own transformer from the architecture the checkpoint records."""
    if ck.config is not None:
        return ck.config
    if ck.metadata.get(ARCH_KEY) == "transformer":
        try:
            args = json.loads(ck.metadata.get(ARGS_KEY, "{}"))
        except ValueError:
            return None
        default = inspect.signature(Transformer).parameters["heads"].default
        return {"num_attention_heads": args.get("heads", default)}
    return None


def choose_spec(
    spec: str | PermutationSpec, ck: Checkpoint, model: ModelChoice, data: str | None = None
) -> tuple[PermutationSpec, str]:
    """A spec from ``auto`` (traced from a model the user named, else inferred from names),
    ``trace`` (the run's model), a family name, a spec file, or a PermutationSpec."""
    if isinstance(spec, PermutationSpec):
        s, source = spec, "given"
    elif spec == "trace" or (spec == "auto" and model.source == "--model"):
        s, source = traced_spec(ck, model, data)
    elif spec == "auto":
        s = infer_spec(ck.shapes, order=ck.order, source=ck.name, config=spec_config(ck))
        source = f"inferred:{s.family}"
    elif spec in {f.name for f in list_specs()}:
        s = infer_spec(ck.shapes, spec, order=ck.order, source=ck.name, config=spec_config(ck))
        source = f"family:{spec}"
    elif Path(spec).suffix in (".yaml", ".yml", ".json") or os.sep in spec or Path(spec).exists():
        s = load_spec(spec)
        source = f"file:{spec}"
        problems = s.problems(ck.shapes)
        if problems:
            raise SpecError(problems, "the spec does not fit this checkpoint", source=spec)
    else:
        infer_spec(ck.shapes, spec)  # raises the unknown-family error with suggestions
        raise ConfigError(f"unknown spec '{spec}'")
    if not s.sizes:
        raise SpecError("the spec has no permutation groups; nothing to align", source=ck.name)
    return s, source
