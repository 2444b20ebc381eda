"""The run's resolution, as a table: (command, options, checkpoint kind) -> the model or why
there is none, the data and evaluation, the verification or why it cannot run, the matcher."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run, tiny
from safetensors.torch import save_file

from rebasin.commands.resolve import Run, resolve_run
from rebasin.core.errors import RebasinError
from rebasin.models import build_model
from rebasin.options import build_options

ARGS = {"in_features": 32, "hidden": 16, "depth": 2, "num_classes": 4}


def _mlp(path: Path, seed: int, meta: dict[str, str], norm: str = "none") -> Path:
    torch.manual_seed(seed)
    save_file(build_model("mlp", **ARGS, norm=norm).state_dict(), str(path), metadata=meta)
    return path


RECORD = {"rebasin.arch": "mlp", "rebasin.arch_args": json.dumps(ARGS), "rebasin.data": "synthetic"}
KINDS: dict[str, Callable[[Path, int], Path]] = {
    "recorded": lambda d, s: _mlp(d / f"r{s}.safetensors", s, RECORD),
    "bare": lambda d, s: _mlp(d / f"b{s}.safetensors", s, {}),
    "refused": lambda d, s: _mlp(d / f"x{s}.safetensors", s, {**RECORD, "rebasin.arch": "evil.mod:make"}),
    "batchnorm": lambda d, s: _mlp(
        d / f"n{s}.safetensors", s, {**RECORD, "rebasin.arch_args": json.dumps({**ARGS, "norm": "bn"})}, "bn"
    ),
}


def _hf(d: Path, s: int) -> Path:
    out = d / f"gpt2-{s}"
    tiny("gpt2", s).save_pretrained(out)
    return out


KINDS["hf"] = _hf

V_NO_MODEL = "not verified: no model (pass --model to verify)"
V_REFUSED = "not verified: the checkpoint's architecture record is refused"

# (command, options, kind) -> expected: model, data (name, bn), evaluated, verification, matcher, data to the matcher
TABLE: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    (
        "merge",
        {},
        "recorded",
        dict(model="mlp", data=None, evaluated=False, verify="synthetic", matcher="auto", fed=False),
    ),
    (
        "merge",
        {"data": "synthetic"},
        "recorded",
        dict(
            model="mlp",
            data=("synthetic", "none"),
            evaluated=True,
            verify="synthetic",
            matcher="auto",
            fed=True,
        ),
    ),
    (
        "merge",
        {"model": "mlp", "model_args": json.dumps(ARGS)},
        "recorded",
        dict(
            model="mlp", data=("synthetic", "none"), evaluated=True, verify="strict", matcher="auto", fed=True
        ),
    ),
    (
        "merge",
        {"method": "weight"},
        "recorded",
        dict(model="mlp", data=None, evaluated=False, verify="synthetic", matcher="weight", fed=False),
    ),
    (
        "merge",
        {"no_verify": True},
        "recorded",
        dict(
            model="mlp",
            data=None,
            evaluated=False,
            verify="not verified: --no-verify",
            matcher="auto",
            fed=False,
        ),
    ),
    (
        "merge",
        {"bn": "reset"},
        "batchnorm",
        dict(
            model="mlp",
            data=("synthetic", "reset"),
            evaluated=True,
            verify="synthetic",
            matcher="auto",
            fed=True,
        ),
    ),
    (
        "merge",
        {"data": "synthetic"},
        "batchnorm",
        dict(
            model="mlp",
            data=("synthetic", "reset"),
            evaluated=True,
            verify="synthetic",
            matcher="auto",
            fed=True,
        ),
    ),
    (
        "merge",
        {"method": "ste"},
        "recorded",
        dict(
            model="mlp",
            data=("synthetic", "none"),
            evaluated=False,
            verify="synthetic",
            matcher="ste",
            fed=True,
        ),
    ),
    (
        "merge",
        {},
        "bare",
        dict(model=None, data=None, evaluated=False, verify=V_NO_MODEL, matcher="auto", fed=False),
    ),
    (
        "merge",
        {},
        "refused",
        dict(model=None, data=None, evaluated=False, verify=V_REFUSED, matcher="auto", fed=False),
    ),
    (
        "merge",
        {},
        "hf",
        dict(
            model="hf:GPT2LMHeadModel",
            data=None,
            evaluated=False,
            verify="example",
            matcher="auto",
            fed=False,
        ),
    ),
    (
        "barrier",
        {},
        "recorded",
        dict(
            model="mlp",
            data=("synthetic", "none"),
            evaluated=True,
            verify="synthetic",
            matcher="auto",
            fed=True,
        ),
    ),
    (
        "barrier",
        {"method": "none"},
        "recorded",
        dict(
            model="mlp",
            data=("synthetic", "none"),
            evaluated=True,
            verify="synthetic",
            matcher=None,
            fed=False,
        ),
    ),
    (
        "permute",
        {},
        "recorded",
        dict(model="mlp", data=None, evaluated=False, verify="synthetic", matcher=None, fed=False),
    ),
    (
        "merge-many",
        {},
        "recorded",
        dict(model="mlp", data=None, evaluated=False, verify="synthetic", matcher=None, fed=False),
    ),
]

ERRORS: list[tuple[str, dict[str, Any], str, str]] = [
    ("merge", {"data": "synthetic"}, "bare", "no model definition: the checkpoint records no architecture"),
    (
        "merge",
        {"data": "synthetic"},
        "refused",
        "the checkpoint's rebasin.arch names 'evil.mod:make', which is not a built-in model",
    ),
    ("merge", {"method": "ste"}, "bare", "method 'ste' needs data to run both models on"),
    (
        "merge",
        {"method": "ste", "data": "synthetic"},
        "bare",
        "method 'ste' runs the models: pass --model NAME or MODULE:FACTORY",
    ),
    ("merge", {"method": "sinkhorn", "cost": "mid"}, "bare", "method 'sinkhorn' with cost 'mid' needs data"),
    ("barrier", {}, "bare", "no data: pass --data"),
]


def _resolve(tmp_path: Path, command: str, values: dict[str, Any], kind: str) -> Run:
    n = 3 if command == "merge-many" else (1 if command == "permute" else 2)
    paths = [KINDS[kind](tmp_path, s) for s in range(n)]
    out = tmp_path / "out.safetensors" if command in ("permute", "merge-many") else None
    return resolve_run(command, build_options(values, command), paths, out)


@pytest.mark.parametrize(("command", "values", "kind", "want"), TABLE, ids=lambda x: str(x)[:30])
def test_resolution_table(
    command: str, values: dict[str, Any], kind: str, want: dict[str, Any], tmp_path: Path
) -> None:
    r = _resolve(tmp_path, command, values, kind)
    assert (r.model.ref.name if r.model.ref else None) == want["model"]
    assert ((r.data.name, r.data.bn) if r.data else None) == want["data"]
    assert (r.evaluation is not None) == want["evaluated"]
    v = r.verification
    if want["verify"] == "strict":
        assert v.model is not None and v.probe_data == "synthetic"
    elif want["verify"] == "example":
        assert v.model is not None and v.probe_data is None and v.cut is None
    elif want["verify"].startswith("not verified"):
        assert v.model is None and v.why_not == want["verify"]
    else:
        assert v.model is not None and v.probe_data == want["verify"]
    assert (r.matcher.name if r.matcher else None) == want["matcher"]
    assert r.matcher_data == want["fed"]


@pytest.mark.parametrize(("command", "values", "kind", "line"), ERRORS, ids=lambda x: str(x)[:30])
def test_resolution_errors(
    command: str, values: dict[str, Any], kind: str, line: str, tmp_path: Path
) -> None:
    with pytest.raises(RebasinError) as e:
        _resolve(tmp_path, command, values, kind)
    assert line in e.value.message


def test_a_large_model_is_verified_on_its_first_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("rebasin.verify.plan.VERIFY_BYTES", 1000)
    v = _resolve(tmp_path, "merge", {}, "hf").verification
    assert v.cut == ("n_layer", 2)
    assert v.probe == "the model's example input, on the model cut to its first of 2 layers"


def test_dry_run_prints_the_run_and_writes_nothing(tmp_path: Path) -> None:
    a, b = (KINDS["recorded"](tmp_path, s) for s in (0, 1))
    out = tmp_path / "m.safetensors"
    code, stdout, err = run("merge", a, b, "-o", out, "--data", "synthetic", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(stdout)
    assert plan["method"] == "auto" and plan["matcher_data"] is True
    assert plan["spec"]["groups"] == {"P_net.0": 16, "P_net.2": 16}
    assert plan["outputs"] == [{"path": str(out), "role": "-o", "kind": "checkpoint"}]
    assert plan["estimate"]["seconds"] > 0 and plan["estimate"]["peak_bytes"] > 0
    assert "synthetic" in plan["data"] and "naive and aligned" in plan["evaluation"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r0.safetensors", "r1.safetensors"]
    code, _, err = run("merge", a, b, "-o", out, "--dry-run")
    assert code == 0 and "dry run: every check before matching passed" in err
    # the same one-line error as the real run, and exit 2
    out.write_bytes(b"x")
    for args in (["--dry-run"], []):
        code, stdout, err = run("merge", a, b, "-o", out, *args)
        assert code == 2 and err.splitlines()[0] == f"error: {out}: already exists"


@pytest.mark.parametrize("command", ["barrier", "permute", "merge-many"])
def test_dry_run_of_every_command(command: str, tmp_path: Path) -> None:
    paths = [KINDS["recorded"](tmp_path, s) for s in range(3 if command == "merge-many" else 2)]
    if command == "permute":
        paths = paths[:1]
    extra = ["-o", tmp_path / "o.safetensors"] if command != "barrier" else ["--plot", tmp_path / "c.png"]
    before = sorted(tmp_path.iterdir())
    code, stdout, err = run(command, *paths, *extra, "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(stdout)["command"] == command
    assert sorted(tmp_path.iterdir()) == before


def test_batch_dry_run_validates_every_item(tmp_path: Path) -> None:
    a, b = (KINDS["recorded"](tmp_path, s) for s in (0, 1))
    c = KINDS["bare"](tmp_path, 2)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"format_version: 1\nitems:\n"
        f"  - {{name: m, a: {a}, b: {b}, output: m.safetensors}}\n"
        f"  - {{name: naive, a: {a}, b: {b}, data: synthetic, method: none}}\n"
    )
    code, stdout, err = run("batch", plan, "--dry-run", "--json")
    assert code == 0, err
    assert [i["name"] for i in json.loads(stdout)["items"]] == ["m", "naive"]
    assert not (tmp_path / "m.safetensors").exists()
    plan.write_text(plan.read_text() + f"  - {{name: broken, a: {c}, b: {b}, data: synthetic}}\n")
    code, stdout, err = run("batch", plan, "--dry-run")
    assert code == 2 and stdout == ""
    assert "item 'broken': " in err.splitlines()[0] and "no model definition" in err.splitlines()[0]
