"""Sizes given as text (``--shard-size 2GB``)."""

from __future__ import annotations

import re

from rebasin.core.errors import ConfigError


def parse_size(text: str | int | None) -> int | None:
    """Parse '500MB', '2GB', '1GiB' or a byte count; None stays None."""
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text <= 0:
            raise ConfigError(f"invalid size '{text}' (must be positive)")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"invalid size '{text}' (use e.g. 500MB, 2GB, 1GiB)")
    value = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("B").rstrip("I")]
    size = int(value * base**power)
    if size <= 0:
        raise ConfigError(f"invalid size '{text}' (must be positive)")
    return size
