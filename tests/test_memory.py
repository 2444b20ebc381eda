"""glibc heap settings: the reuse context restores the fixed threshold and is a no-op elsewhere."""

from __future__ import annotations

import torch

from rebasin import _memory


def test_reusing_freed_memory_is_a_no_op_until_the_threshold_is_fixed(monkeypatch) -> None:
    monkeypatch.setattr(_memory, "_fixed", False)
    calls: list[object] = []
    monkeypatch.setattr(_memory, "_libc", lambda: calls.append("libc"))
    with _memory.reusing_freed_memory():
        torch.ones(1 << 20).sum()
    assert calls == []


def test_reusing_freed_memory_restores_the_threshold_and_trims(monkeypatch) -> None:
    seen: list[tuple[str, int]] = []

    class Libc:
        def mallopt(self, what: int, value: int) -> int:
            seen.append(("mallopt", value))
            return 1

        def malloc_trim(self, pad: int) -> int:
            seen.append(("trim", pad))
            return 1

    monkeypatch.setattr(_memory, "_fixed", True)
    monkeypatch.setattr(_memory, "_libc", Libc)
    try:
        with _memory.reusing_freed_memory():
            raise KeyError("inside")
    except KeyError:
        pass
    assert seen == [
        ("mallopt", _memory.REUSE_THRESHOLD),
        ("mallopt", _memory.MMAP_THRESHOLD),
        ("trim", 0),
    ]
