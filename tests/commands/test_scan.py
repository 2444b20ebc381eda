"""Scanning checkpoints at once: the error of a scan in order, and a failure stops later scans."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from rebasin.commands.inputs import check_all_finite
from rebasin.core.errors import CheckpointError


class Fake:
    """A checkpoint of ``n`` tensors, one of them (``bad``) infinite, scanned slowly."""

    def __init__(
        self, name: str, n: int, bad: int | None, gate: threading.Event | None = None, wait: float = 5.0
    ):
        self.name, self.n, self.bad, self.gate, self.wait, self.seen = name, n, bad, gate, wait, 0

    def scan(self, visit: Callable[[str, torch.Tensor], None]) -> None:
        for i in range(self.n):
            if self.gate is not None:
                self.gate.wait(self.wait)
            self.seen += 1
            visit(f"t{i}", torch.full((4,), float("inf") if i == self.bad else 1.0))


def test_the_first_failing_checkpoint_is_named_whichever_fails_first() -> None:
    gate = threading.Event()
    a = Fake("a", 3, bad=2, gate=gate)  # fails late, and only once b has failed
    b = Fake("b", 3, bad=0)
    threading.Timer(0.2, gate.set).start()
    with pytest.raises(CheckpointError) as e:
        check_all_finite([a, b])  # type: ignore[list-item]
    assert "tensor 't2' contains Inf values" in str(e.value) and e.value.source == "a"


def test_a_failure_stops_the_scans_after_it() -> None:
    a = Fake("a", 2, bad=0)
    b = Fake("b", 10_000, bad=None, gate=threading.Event(), wait=0.01)  # 100 s unless stopped
    with pytest.raises(CheckpointError):
        check_all_finite([a, b])  # type: ignore[list-item]
    assert b.seen < 10_000


def test_clean_checkpoints_pass() -> None:
    cks = [Fake(n, 5, bad=None) for n in "abc"]
    check_all_finite(cks)  # type: ignore[arg-type]
    assert [c.seen for c in cks] == [5, 5, 5]
