"""Input checks shared by every command: two checkpoints that fit each other, finite float weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rebasin.checkpoint import Checkpoint, natural_key
from rebasin.core.errors import CheckpointError, ConfigError
from rebasin.spec.core import PermutationSpec


def _fmt_shape(s: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def _names(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_pair(a: Checkpoint, b: Checkpoint) -> None:
    """Both checkpoints must hold the same tensor names and shapes."""
    missing = sorted(set(a.shapes) - set(b.shapes), key=natural_key)
    if missing:
        raise CheckpointError(f"tensors missing that A has: {_names(missing)}", source=b.name)
    extra = sorted(set(b.shapes) - set(a.shapes), key=natural_key)
    if extra:
        raise CheckpointError(f"tensors missing that B has: {_names(extra)}", source=a.name)
    for k in sorted(a.shapes, key=natural_key):
        if a.shapes[k] != b.shapes[k]:
            raise CheckpointError(
                f"tensor '{k}' has shape {_fmt_shape(b.shapes[k])}, A has {_fmt_shape(a.shapes[k])}",
                source=b.name,
            )


def check_weights(ck: Checkpoint, spec: PermutationSpec | None = None) -> None:
    """Weights must be floating point and finite."""
    check_dtypes(ck, spec)
    check_finite(ck)


def check_dtypes(ck: Checkpoint, spec: PermutationSpec | None = None) -> None:
    """Weights (the spec's tensors, and every ``weight`` and ``bias``) must be floating point
    (from the headers alone)."""
    touched = set(spec.params) if spec else set()
    for k in ck.state:
        dt = ck.dtypes[k]
        if not dt.is_floating_point and (
            k in touched or k.endswith((".weight", ".bias")) or k in ("weight", "bias")
        ):
            raise CheckpointError(
                f"tensor '{k}' has integer dtype {str(dt).removeprefix('torch.')}; "
                "weights must be floating point",
                source=ck.name,
            )


def check_finite(ck: Checkpoint) -> None:
    """Float tensors must be finite (one read of the files, which also gives their SHA-256)."""

    def finite(k: str, t: torch.Tensor) -> None:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise CheckpointError(f"tensor '{k}' contains {what} values", source=ck.name)

    ck.scan(finite)


def check_device(name: str) -> None:
    """The device must exist on this machine and in this torch build."""

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device '{name}' is not a device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {name}: no CUDA GPU is available (this torch build or machine has none)",
                "use --device cpu",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here", "use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: rebasin runs on cpu, cuda or mps")
