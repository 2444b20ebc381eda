"""Interrupting a write at any moment leaves the complete old output or the complete new one,
never a mix; SIGTERM removes temporary files; the next run removes what a kill -9 left."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rebasin.checkpoint import load_checkpoint

WRITER = """
import sys, signal, torch
from rebasin.checkpoint import save_checkpoint
from rebasin.cli.failures import on_sigterm, Terminated
signal.signal(signal.SIGTERM, on_sigterm)
out, size = sys.argv[1], sys.argv[2]
states = [{f"t{i:02d}": torch.full((64, 64), float(v)) for i in range(40)} for v in (1, 2)]
open(sys.argv[3], "w").close()
k = 0
try:
    while True:
        save_checkpoint(states[k % 2], out, {"version": str(k % 2)}, shard_size=size)
        k += 1
except Terminated:
    sys.exit(143)
"""


def _interrupt(out: Path, delay: float, sig: int) -> None:
    """Start a writer looping over two versions of ``out``; send it ``sig`` after ``delay``."""
    ready = out.parent.parent / "ready"
    ready.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(out), "40KB", str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), "the writer did not start"
    time.sleep(delay)
    p.send_signal(sig)
    p.wait(timeout=30)


def _names(readable: Path) -> set[str]:
    import json

    if readable.is_dir():
        return set()
    return set(json.loads(readable.read_text())["weight_map"].values())


def _whole(out: Path) -> float:
    """The output loads and every tensor holds the same value (old or new, never a mix)."""
    ck = load_checkpoint(out)
    values = {float(ck.state[k][0, 0]) for k in ck.state}
    assert len(ck.state) == 40, sorted(ck.state)
    assert len(values) == 1, values
    return values.pop()


@pytest.mark.parametrize("target", ["m.safetensors", "folder"])
def test_interrupted_sharded_overwrites_are_old_or_new(tmp_path: Path, target: str) -> None:
    (tmp_path / "w").mkdir()
    tmp_path = tmp_path / "w"
    out = tmp_path / target
    readable = out if target == "folder" else tmp_path / "m.safetensors.index.json"
    seen = set()
    for i, delay in enumerate([0.1, 0.27, 0.44, 0.61, 0.83]):
        sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        _interrupt(out, delay, sig)
        if not readable.exists():
            continue  # killed before its first write finished: nothing there, which is fine
        seen.add(_whole(readable))
        if sig == signal.SIGTERM:
            # a SIGTERM cleans up after itself (a committed index may still name its temporaries)
            named = {v for v in _names(readable)}
            left = [
                f.name for f in tmp_path.iterdir() if f.name.startswith(".rebasin-") and f.name not in named
            ]
            assert not left, left
    assert seen <= {1.0, 2.0}
    # the next write into the folder removes what killed runs left
    from rebasin.checkpoint import save_checkpoint

    save_checkpoint({"t00": torch.zeros(2)}, out, shard_size=None)
    assert not [f.name for f in tmp_path.iterdir() if f.name.startswith(".rebasin-")]
