"""Untrusted files run nothing: checkpoint metadata and plans never import code by themselves;
index entries stay inside their folder; special files are refused unread."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import expect_error, run
from safetensors import safe_open
from safetensors.torch import save_file

from rebasin.models import build_model


def _evil(tmp_path: Path, marker: Path, key: str = "arch") -> tuple[Path, Path]:
    """A pair whose A records code to run (the attack) and a plain B."""
    torch.manual_seed(0)
    a = build_model("mlp", in_features=32, hidden=16, num_classes=4).state_dict()
    torch.manual_seed(1)
    b = build_model("mlp", in_features=32, hidden=16, num_classes=4).state_dict()
    meta = {
        "rebasin.arch": "mlp",
        "rebasin.arch_args": json.dumps({"in_features": 32, "hidden": 16, "num_classes": 4}),
    }
    if key == "arch":
        meta = {
            "rebasin.arch": "subprocess:run",
            "rebasin.arch_args": json.dumps({"args": f"touch {marker}", "shell": True}),
        }
    else:
        meta["rebasin.data"] = "os:system"
    pa, pb = tmp_path / "evil.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa), metadata=meta)
    save_file(b, str(pb))
    return pa, pb


@pytest.mark.parametrize(
    "args",
    [
        ["barrier", "{a}", "{b}", "--data", "synthetic"],
        ["merge", "{a}", "{b}", "-o", "{out}", "--data", "synthetic"],
        ["spec", "{a}", "--spec", "trace"],
        ["merge", "{a}", "{b}", "-o", "{out}", "--method", "activation", "--data", "synthetic"],
    ],
)
def test_metadata_naming_code_runs_nothing(tmp_path: Path, args: list[str]) -> None:
    marker = tmp_path / "marker"
    a, b = _evil(tmp_path, marker)
    out = tmp_path / "m.safetensors"
    argv = [x.format(a=a, b=b, out=out) for x in args]
    expect_error(
        argv,
        f"{a}: the checkpoint's rebasin.arch names 'subprocess:run', which is not a built-in model",
        "rebasin never imports code a file names; if you trust it, pass it yourself: --model subprocess:run",
    )
    assert not marker.exists()
    assert not out.exists()


def test_data_record_naming_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    a, b = _evil(tmp_path, marker, key="data")
    expect_error(
        ["barrier", a, b],
        f"{a}: the checkpoint's rebasin.data names 'os:system', which is not a built-in data set",
        "rebasin never imports code a file names; if you trust it, pass it yourself: --data os:system",
    )


def test_plain_merge_works_and_does_not_spread_the_record(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    a, b = _evil(tmp_path, marker)
    out = tmp_path / "m.safetensors"
    code, _, err = run("merge", a, b, "-o", out)
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert "rebasin.arch" not in meta and "rebasin.arch_args" not in meta
    assert not marker.exists()


def _plan(tmp_path: Path, a: Path, b: Path, marker: Path) -> Path:
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "from rebasin.models import build_model\n"
        "def make(**kw):\n    return build_model('mlp', in_features=32, hidden=16, num_classes=4)\n"
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "format_version: 1\nitems:\n"
        f"  - {{name: hooked, a: {a}, b: {b}, model: '{hook}:make', data: synthetic, alphas: 3}}\n"
    )
    return plan


def test_plan_code_needs_allow_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    a, b = _evil(tmp_path, marker, key="data")
    plan = _plan(tmp_path, a, b, marker)
    expect_error(
        ["batch", plan],
        f"{plan}: item 'hooked': 'model' names code ('{tmp_path / 'hook.py'}:make'); "
        "pass --allow-code to import and run it",
    )
    assert not marker.exists()
    code, _, err = run("batch", plan, "--allow-code")
    assert code == 0, err
    assert marker.exists()  # the user said so


@pytest.mark.parametrize(
    "entry", ["../outside.safetensors", "/etc/passwd", "../../etc/passwd", "sub/../../x.safetensors"]
)
def test_index_entries_stay_inside_their_folder(tmp_path: Path, entry: str) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    index = d / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": entry}}))
    expect_error(
        ["inspect", index],
        f"{index}: shard '{entry}' named by the index lies outside its folder; refusing it",
    )


def test_index_entry_through_a_symlink_leaving_the_folder(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    (d / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    index = d / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "link.safetensors"}}))
    expect_error(
        ["inspect", index],
        f"{index}: shard 'link.safetensors' named by the index leads outside its folder (symbolic link); refusing it",
    )


def test_a_fifo_is_refused_unread(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    expect_error(["inspect", fifo], f"{fifo}: is a FIFO, not a checkpoint file; refusing to read it")


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path, mlp_pair: tuple[Path, Path]) -> None:
    a, b = mlp_pair
    spec = tmp_path / "bomb.yaml"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(20)
    ]
    spec.write_text("\n".join(lines) + "\n")
    expect_error(
        ["merge", a, b, "-o", tmp_path / "m.safetensors", "--spec", spec],
        f"{spec}: cannot parse spec (YAML aliases are not allowed (line 2))",
    )
