"""Verification wiring: build the model (when one can be built) and check every permutation a
command writes or measures: pi(B) must compute what B computes."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from rebasin.checkpoint import Checkpoint
from rebasin.core.errors import CheckpointError, ConfigError
from rebasin.matching.result import Permutation
from rebasin.options import Options
from rebasin.spec.core import PermutationSpec
from rebasin.verify.equivalence import Verifier

NOT_VERIFIED = {"ok": None}


def verifier_for(opts: Options, ck: Checkpoint) -> tuple[Verifier | None, str]:
    """A verifier for ``ck``'s model, or None and why not. A model given with ``--model`` must
    build; a recorded architecture or ``config.json`` is used when it is trusted."""
    from rebasin.models.resolve import recorded_arch, recorded_data, resolve_model
    from rebasin.spec.trace import TraceError, example_input

    if opts.output.no_verify:
        return None, "not verified: --no-verify"
    model = opts.model.model
    if model is None:
        try:
            known = ck.config is not None or recorded_arch(ck.metadata, ck.name) is not None
        except ConfigError:
            return None, "not verified: the checkpoint's architecture record is refused"
        if not known:
            return None, "not verified: no model (pass --model to verify)"
    ref = resolve_model(model, opts.model.model_args, ck.metadata, ck.name, ck.config)
    scope, scope_note = None, ""
    size = 4 * ck.num_parameters()
    if ref.config is not None and size > VERIFY_BYTES:  # too large to build whole: its first layer
        key = next((k for k in LAYER_KEYS if isinstance(ref.config.get(k), int)), None)
        if key is None:
            return None, f"not verified: the model is too large to build for a check ({size / 2**30:.1f} GB)"
        ref = replace(ref, config={**ref.config, key: 1})
        scope = first_layer
        scope_note = f", on the model cut to its first of {ck.config[key]} layers"  # type: ignore[index]
    built = ref.factory()()  # one model serves the probe and every check

    def factory() -> Any:
        return built

    data = opts.evaluate.data if opts.evaluate else None
    try:
        data = data or recorded_data(ck.metadata, ck.name)
    except ConfigError:
        data = None
    if data:
        from rebasin.data import load_data

        x = load_data(data, opts.run.seed).x_train[:8]
        verifier = Verifier(factory, (x,), f"{len(x)} examples of {data}{scope_note}", ref.name)
    else:
        try:
            inputs = example_input(built)
        except TraceError:
            return None, "not verified: no probe input (pass --data)"
        verifier = Verifier(factory, inputs, f"the model's example input{scope_note}", ref.name)
    verifier.strict = model is not None  # a model built from a record must fit, else no verdict
    verifier.scope = scope
    return verifier, ""


VERIFY_BYTES = 2 << 30
"""Largest float32 model built whole for a check; larger Hugging Face models are checked on a
copy cut to their first layer (embeddings, one block, final norm and head), which runs every
rule of the spec's layer pattern at bounded memory."""

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def first_layer(name: str) -> bool:
    """Whether a tensor belongs to a model cut to its first layer."""
    m = _LAYER.search(name)
    return m is None or int(m.group(1)) == 0


def verify(
    verifier: Verifier | None,
    why_not: str,
    ck: Checkpoint,
    spec: PermutationSpec,
    perm: Permutation,
    what: str = "pi(B)",
    of: str = "B",
) -> dict[str, Any]:
    """Check that ``perm`` preserves ``ck``'s function; the report's ``equivalence`` section.
    Raises CheckpointError naming the first group that breaks it."""
    if verifier is None:
        return {**NOT_VERIFIED, "reason": why_not}
    try:
        eq = verifier.check(ck.state, spec, perm)
    except ConfigError as e:
        if verifier.strict:
            raise
        return {
            **NOT_VERIFIED,
            "reason": f"not verified: the model built from the checkpoint does not fit it ({e.message})",
        }
    if not eq.ok:
        group = verifier.first_breaking_group(ck.state, spec, perm)
        where = f"; the first group that breaks it: '{group}'" if group else ""
        raise CheckpointError(
            f"{what} does not compute what {of} computes (max abs diff {eq.max_abs_diff:.3g}, "
            f"relative {eq.relative:.2g} on {eq.probe}){where}",
            f"check the spec (rebasin spec), freeze the group (--freeze {group or 'GROUP'}), "
            "or pass --no-verify to write it anyway",
            source=ck.name,
        )
    return eq.to_dict()
