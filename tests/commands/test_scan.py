"""Scanning checkpoints at once: the error of a scan in order, and a failure stops later scans."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rebasin.commands.inputs import check_all_finite
from rebasin.core.errors import CheckpointError
from rebasin.matching.costs import GroupProducts
from rebasin.spec.core import Member


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


class Stored:
    """A checkpoint of real tensors, scanned in a given order (optionally slowly)."""

    def __init__(self, name: str, state: dict[str, torch.Tensor], order: list[str], pause: float = 0.0):
        self.name, self.state, self.order, self.pause = name, state, order, pause

    def scan(self, visit: Callable[[str, torch.Tensor], None]) -> None:
        for k in self.order:
            if self.pause:
                threading.Event().wait(self.pause)
            visit(k, self.state[k])


def _states(n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    a = {f"t{i}": torch.randn(8, 5, generator=g).bfloat16() for i in range(n)}
    b = {k: torch.randn(8, 5, generator=g).bfloat16() for k in a}
    return a, b


@pytest.mark.parametrize("slow", ["a", "b", None])
def test_scans_in_the_same_order_take_every_dot(slow: str | None) -> None:
    from rebasin.matching.costs import param_dot

    a, b = _states(12)
    order = list(a)
    cks = [Stored(n, s, order, 0.01 if n == slow else 0.0) for n, s in (("a", a), ("b", b))]
    names = [k for k in order if k != "t3"]
    dots = check_all_finite(cks, names)  # type: ignore[arg-type]
    assert dots == {k: param_dot(a[k], b[k]) for k in names}


@pytest.mark.parametrize("room", [0, None])
def test_scans_in_different_orders_stop_meeting_without_waiting_forever(
    monkeypatch, room: int | None
) -> None:
    """With room for one waiting tensor each, reversed orders stop meeting; with room for all
    of them, every dot is taken all the same."""
    from rebasin.matching.costs import param_dot

    if room is not None:
        monkeypatch.setattr("rebasin.commands.inputs.PARK_BYTES", room)
    a, b = _states(12)
    cks = [Stored("a", a, list(a)), Stored("b", b, list(reversed(list(b))), 0.001)]
    dots = check_all_finite(cks, list(a))  # type: ignore[arg-type]
    assert all(v == param_dot(a[k], b[k]) for k, v in dots.items())
    assert len(dots) < 12 if room == 0 else len(dots) == 12


def test_a_failing_scan_still_names_its_checkpoint_when_meeting() -> None:
    a, b = _states(6)
    b["t4"] = torch.full((8, 5), float("nan")).bfloat16()
    cks = [Stored("a", a, list(a), 0.01), Stored("b", b, list(b))]
    with pytest.raises(CheckpointError) as e:
        check_all_finite(cks, list(a))  # type: ignore[arg-type]
    assert "tensor 't4' contains NaN values" in str(e.value) and e.value.source == "b"


class Located(Stored):
    """A stored checkpoint whose tensors lie in one file in its scan order (as safetensors)."""

    def __init__(self, name: str, state: dict[str, torch.Tensor], order: list[str], pause: float = 0.0):
        super().__init__(name, state, order, pause)
        self.files = [Path(name)]
        self.locations = {k: SimpleNamespace(path=Path(name), begin=i) for i, k in enumerate(order)}


def _first(a: dict[str, torch.Tensor]) -> GroupProducts:
    """A group of 8 units over every tensor's rows; the even tensors also permuted by others."""
    members = [Member(k, 0) for k in a]
    return GroupProducts("g", 8, members, members[::2])


@pytest.mark.parametrize("slow", ["a", "b", None])
def test_the_scan_takes_the_first_unit_s_products_in_a_s_order(slow: str | None) -> None:
    """Both files in the same order: every member's product is taken, moving and fixed apart,
    summed in A's order (the same bits each time), and the dots all the same."""
    a, b = _states(12)
    order = list(a)
    products = _first(a)
    cks = [Located(n, s, order, 0.01 if n == slow else 0.0) for n, s in (("a", a), ("b", b))]
    dots = check_all_finite(cks, order[:5], products)  # type: ignore[arg-type]
    assert set(dots) == set(order[:5])
    assert products.covered == {Member(k, 0) for k in a}
    moving = torch.zeros(8, 8)
    fixed = torch.zeros(8, 8)
    for i, k in enumerate(order):
        target = moving if i % 2 == 0 else fixed
        target.addmm_(a[k].float(), b[k].float().T)
    assert torch.equal(products.moving, moving) and torch.equal(products.fixed, fixed)


def test_the_scan_takes_no_products_from_files_in_different_orders() -> None:
    a, b = _states(6)
    products = _first(a)
    cks = [Located("a", a, list(a)), Located("b", b, list(reversed(list(b))))]
    dots = check_all_finite(cks, list(a), products)  # type: ignore[arg-type]
    assert not products.covered and len(dots) <= 6


def test_a_failing_scan_ends_the_products_too(monkeypatch) -> None:
    """The products wait for the scans' pairs; a failure ends them all the same (no hang), with
    little room for queued pairs."""
    monkeypatch.setattr("rebasin.commands.inputs.PARK_BYTES", 0)
    monkeypatch.setattr("rebasin.commands.inputs.QUEUE_BYTES", 0)
    a, b = _states(40)
    b["t20"] = torch.full((8, 5), float("inf")).bfloat16()
    products = _first(a)
    cks = [Located("a", a, list(a), 0.001), Located("b", b, list(b))]
    with pytest.raises(CheckpointError):
        check_all_finite(cks, list(a), products)  # type: ignore[arg-type]
