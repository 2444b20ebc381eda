"""Corrupted files from other people: never a traceback, exit 2 with one ``error:`` line, nothing
written. Hypothesis generates safetensors headers, shard indexes, spec files and batch plans."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from helpers import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _pair(d: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    state = {
        "net.0.weight": torch.randn(8, 4),
        "net.0.bias": torch.randn(8),
        "net.2.weight": torch.randn(3, 8),
    }
    a, b = d / "a.safetensors", d / "b.safetensors"
    save_file(state, str(a))
    save_file({k: v + 1 for k, v in state.items()}, str(b))
    return a, b


def _one_line_or_ok(code: int, stderr: str, ok: tuple[int, ...] = (0,)) -> None:
    if code in ok:
        return
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert lines and lines[0].startswith("error: "), stderr
    assert not lines[0].startswith("error: unexpected error"), stderr
    assert len(lines) <= 2 and all(line.startswith(("error: ", "hint: ")) for line in lines), stderr


def _no_output(d: Path) -> None:
    assert not (d / "out.safetensors").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".rebasin-")]


@SETTINGS
@given(
    header=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)),
    length=st.integers(0, 2**40) | st.none(),
)
def test_corrupted_safetensors_headers(header: bytes, length: int | None) -> None:
    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        a, _ = _pair(d)
        body = a.read_bytes()
        n = struct.unpack("<Q", body[:8])[0]
        bad = d / "bad.safetensors"
        bad.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + body[8 + n :])
        for args in (["inspect", bad], ["merge", a, bad, "-o", d / "out.safetensors"]):
            code, _, err = run(*args)
            _one_line_or_ok(code, err)
        if code != 0:
            _no_output(d)


@SETTINGS
@given(
    weight_map=st.dictionaries(
        st.text(max_size=10),
        json_values | st.sampled_from(["../x", "/etc/passwd", "a/../../b", "b.safetensors", ""]),
        max_size=4,
    ),
    extra=json_values,
)
def test_corrupted_shard_indexes(weight_map: dict[str, object], extra: object) -> None:
    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        _, b = _pair(d)
        index = d / "m.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": weight_map, "metadata": extra}))
        code, _, err = run("inspect", index)
        _one_line_or_ok(code, err)
        code, _, err = run("merge", index, b, "-o", d / "out.safetensors")
        _one_line_or_ok(code, err)
        if code != 0:
            _no_output(d)


@SETTINGS
@given(doc=json_values | st.text(max_size=200))
def test_corrupted_spec_files(doc: object) -> None:
    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        a, b = _pair(d)
        spec = d / "spec.yaml"
        spec.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        code, _, err = run("merge", a, b, "-o", d / "out.safetensors", "--spec", spec)
        _one_line_or_ok(code, err)
        if code != 0:
            _no_output(d)


items = st.fixed_dictionaries(
    {"a": st.just("a.safetensors"), "b": st.just("b.safetensors")},
    optional={
        "output": st.text(max_size=8) | json_values,
        "method": st.sampled_from(["weight", "sinkhorn", "nope"]) | json_values,
        "restarts": json_values,
        "alpha": json_values,
        "freeze": json_values,
        "spec": st.text(max_size=8),
        "bogus": json_values,
    },
)


@SETTINGS
@given(
    plan=st.fixed_dictionaries(
        {"format_version": st.sampled_from([1, 2, "1"]), "items": st.lists(items, max_size=3) | json_values},
        optional={"defaults": json_values},
    )
    | json_values
)
def test_corrupted_plans(plan: object) -> None:
    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        _pair(d)
        p = d / "plan.yaml"
        p.write_text(json.dumps(plan))
        code, _, err = run("batch", p)
        _one_line_or_ok(code, err, ok=(0, 1))
