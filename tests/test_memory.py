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


def test_the_heap_is_trimmed_now_and_then_within_reuse_only(monkeypatch) -> None:
    trims: list[float] = []
    clock = [100.0]

    class Libc:
        def mallopt(self, what: int, value: int) -> int:
            return 1

        def malloc_trim(self, pad: int) -> int:
            trims.append(clock[0])
            return 1

    monkeypatch.setattr(_memory, "_fixed", True)
    monkeypatch.setattr(_memory, "_libc", Libc)
    monkeypatch.setattr(_memory.time, "monotonic", lambda: clock[0])
    _memory.now_and_then_trim()
    assert trims == []  # outside the reuse context: nothing
    with _memory.reusing_freed_memory():
        for _ in range(10):
            clock[0] += 0.25
            _memory.now_and_then_trim()
    assert trims == [101.0, 102.0, 102.5]  # once a second, then on leaving
    _memory.now_and_then_trim()
    assert len(trims) == 3
