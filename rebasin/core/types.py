"""Types many rooms share, torch-free (torch appears only in annotations)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import torch

PathLike: TypeAlias = "str | os.PathLike[str]"

Permutation: TypeAlias = "dict[str, torch.Tensor]"
"""One permutation per group: ``p[i]`` is the unit of B placed at position i."""

Progress: TypeAlias = Callable[[str, float, float], None]
"""Progress callback: (description, completed, total)."""
