"""Infer a spec from model code by tracing it and joining tensor axes with union-find.

The model runs once, eagerly, on an example input under a ``TorchFunctionMode`` that records
every torch function call (``F.linear``, ``F.conv2d``, ``F.batch_norm``, tensor methods,
operators ...). Unlike torch.fx's symbolic tracing this follows Python control flow (``if
x.dim() == 3``), and it sees functional calls and modules alike, because modules end in them.
Every axis of every recorded tensor and of every parameter is a node. Operations link the axes that
must move together: elementwise ops and residual adds (with broadcasting), norms, pooling over
other axes, matmul contraction, transposes and permutes, layers' input/output dims and their
parameters. Connected components are the candidate groups; a component touching a model input or
output stays fixed. Reshapes that merge a moving axis with trailing fixed ones (flatten before a
classifier) become block members; concatenation and chunking become segments of a fused axis.
Anything the tracer does not understand fixes every axis it touches, and is listed in the spec's
notes: it is never permuted wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rebasin.core.errors import SpecError
from rebasin.spec.core import PermutationSpec
from rebasin.spec.trace.assemble import build_spec
from rebasin.spec.trace.recorder import Recorder

__all__ = ["TraceError", "example_input", "trace_spec"]


class TraceError(SpecError):
    """The model could not be traced."""


def example_input(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """An example input guessed from the first layer (override with a model attribute
    ``example_input``: a tensor, a tuple of tensors, or a callable returning one)."""
    given = getattr(model, "example_input", None)
    if given is not None:
        v = given() if callable(given) else given
        return v if isinstance(v, tuple) else (v,)
    cfg = getattr(model, "config", None)  # a Hugging Face model: its config says what it reads
    kind = getattr(model, "main_input_name", None)
    if cfg is not None and kind == "pixel_values" and hasattr(cfg, "image_size"):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        return (torch.randn(2, getattr(cfg, "num_channels", 3), size, size),)
    if cfg is not None and kind == "input_ids" and hasattr(cfg, "vocab_size"):
        return (torch.randint(0, cfg.vocab_size, (2, 8)),)
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return (torch.randint(0, m.num_embeddings, (2, 8)),)
        if isinstance(m, nn.Linear):
            return (torch.randn(2, m.in_features),)
        if isinstance(m, nn.Conv1d):
            return (torch.randn(2, m.in_channels, 32),)
        if isinstance(m, nn.Conv2d):
            return (torch.randn(2, m.in_channels, 32, 32),)
        if isinstance(m, nn.MultiheadAttention):
            return (torch.randn(2, 8, m.embed_dim),)
    raise TraceError("cannot guess an input shape: give the model an 'example_input' attribute")


def trace_spec(
    model: nn.Module, inputs: Sequence[torch.Tensor] | None = None, name: str = "model"
) -> PermutationSpec:
    """The permutation spec of ``model``, by running it once on ``inputs`` (guessed when None)
    and recording every torch function call on its tensors."""
    model = model.eval()
    args = tuple(inputs) if inputs is not None else example_input(model)
    tracer = Recorder(model)
    for a in args:
        tracer.fix_tree(a, "model input")
    try:
        with torch.no_grad(), tracer:
            out = model(*args)
    except Exception as e:  # the model's own failure on the example input: one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        where = f" in {tracer.failed_at}" if tracer.failed_at else ""
        raise TraceError(
            f"cannot run model '{name}' on an example input of shape {shapes}{where}: {first}",
            "give the model an 'example_input' attribute, or pass --data",
        ) from None
    tracer.fix_tree(out, "model output")
    if tracer.calls == 0:
        raise TraceError(f"model '{name}' made no torch calls on its input; nothing to trace")
    short = name if "/" not in name else name.rsplit("/", 1)[1]  # a file path: keep its name
    return build_spec(tracer, family=f"traced:{short}")
