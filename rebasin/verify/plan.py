"""How a run's permutations are verified, as decided once (:class:`VerifyPlan`), and building
the verifier it describes: the model, the probe, the scope."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from rebasin.data import load_data
from rebasin.models.resolve import ModelRef
from rebasin.spec.trace import TraceError, example_input
from rebasin.verify.equivalence import Verifier

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


@dataclass(frozen=True)
class VerifyPlan:
    """The check each written permutation gets: the model it runs (None: no check, and
    ``why_not`` says why), the data of its probe (None: the model's example input), and the config
    key and layer count when the model is cut to its first layer. A model that can be built must
    fit the checkpoint as its own library loads it (``rebasin.models.fit.tolerated``): else the
    check fails, and nothing is written without ``--no-verify``."""

    model: ModelRef | None
    probe_data: str | None = None
    cut: tuple[str, int] | None = None
    why_not: str = ""

    @property
    def probe(self) -> str:
        """The probe, in words."""
        scope = f", on the model cut to its first of {self.cut[1]} layers" if self.cut else ""
        what = f"8 examples of {self.probe_data}" if self.probe_data else "the model's example input"
        return what + scope

    def describe(self) -> str:
        if self.model is None:
            return self.why_not
        return f"pi(B) against B with {self.model.name} on {self.probe}"


def skipped(why: str) -> VerifyPlan:
    """A plan that checks nothing, and says why."""
    return VerifyPlan(None, why_not=why)


def cut_for(ref: ModelRef, float_bytes: int) -> tuple[str, int] | str | None:
    """How a model too large to build whole is cut for its check: (config key, layers); None when
    it is built whole; a reason when it cannot be cut."""
    if ref.config is None or float_bytes <= VERIFY_BYTES:
        return None
    key = next((k for k in LAYER_KEYS if isinstance(ref.config.get(k), int)), None)
    if key is None:
        return f"not verified: the model is too large to build for a check ({float_bytes / 2**30:.1f} GB)"
    return key, int(ref.config[key])


def build_verifier(plan: VerifyPlan, seed: int) -> tuple[Verifier | None, str]:
    """The verifier ``plan`` describes (built once), or None and why not."""

    if plan.model is None:
        return None, plan.why_not
    ref = plan.model
    if plan.cut is not None:
        assert ref.config is not None
        ref = replace(ref, config={**ref.config, plan.cut[0]: 1})
    built = ref.factory()()  # one model serves the probe and every check

    def factory() -> Any:
        return built

    if plan.probe_data:
        inputs: tuple[Any, ...] = (load_data(plan.probe_data, seed).x_train[:8],)
    else:
        try:
            inputs = example_input(built)
        except TraceError:
            return None, "not verified: no probe input (pass --data)"
    verifier = Verifier(factory, inputs, plan.probe, ref.name)
    verifier.scope = first_layer if plan.cut is not None else None
    return verifier, ""
