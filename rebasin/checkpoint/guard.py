"""The output guard: what a command may write where."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from rebasin.errors import CheckpointError


def check_output_path(
    out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], force: bool
) -> None:
    """Refuse to overwrite an input, or an existing file unless ``force``."""
    o = Path(out)
    for i in inputs:
        ip = Path(i)
        same = o.resolve() == ip.resolve() or (o.exists() and ip.exists() and o.samefile(ip))
        if same:
            raise CheckpointError(
                "output path is an input; refusing to overwrite it",
                "choose another output path",
                source=str(out),
            )
        if ip.is_dir() and o.resolve().is_relative_to(ip.resolve()):
            raise CheckpointError(
                "output path lies inside an input directory; refusing to write there",
                source=str(out),
            )
    if o.exists() and not force and not (o.is_dir() and not any(o.iterdir())):
        raise CheckpointError("already exists", "pass --force to overwrite", source=str(out))
    if not o.parent.exists():
        raise CheckpointError("output directory does not exist", source=str(out))
