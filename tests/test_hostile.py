"""Hostile inputs, round two: every input protected from --force, only files and folders
replaced, sizes from files bounded before memory is asked for, names shown as written, and no
input that ends in an unexpected error."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run
from safetensors.torch import save_file

from rebasin.models import build_model

ARGS = {"in_features": 32, "hidden": 16, "num_classes": 4}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        save_file(build_model("mlp", **ARGS).state_dict(), str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "s.yaml").write_text("format_version: 1\ngroups: {}\n")
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 32), np.float32), y=np.zeros(10, np.int64))
    (tmp_path / "m.py").write_text("def make():\n    raise RuntimeError('never called')\n")
    return tmp_path


def _refused(folder: Path, args: list[str], victim: str) -> str:
    before = (folder / victim).read_bytes()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code, stdout, err = run(*args)
    finally:
        os.chdir(cwd)
    assert code == 2 and stdout == "", err
    assert (folder / victim).read_bytes() == before
    return err.splitlines()[0]


@pytest.mark.parametrize(
    ("args", "victim"),
    [
        (
            [
                "merge",
                "a.safetensors",
                "b.safetensors",
                "-o",
                "o.safetensors",
                "--spec",
                "s.yaml",
                "--report",
                "s.yaml",
                "--force",
            ],
            "s.yaml",
        ),
        (["merge", "a.safetensors", "b.safetensors", "-o", "d.npz", "--data", "d.npz", "--force"], "d.npz"),
        (
            [
                "merge",
                "a.safetensors",
                "b.safetensors",
                "-o",
                "o.safetensors",
                "--model",
                "m.py:make",
                "--report",
                "m.py",
                "--force",
            ],
            "m.py",
        ),
        (["train", "--data", "d.npz", "-o", "d.npz", "--force"], "d.npz"),
        (["spec", "a.safetensors", "--spec", "s.yaml", "-o", "s.yaml", "--force"], "s.yaml"),
    ],
    ids=[
        "report-onto-spec",
        "output-onto-data",
        "report-onto-model-file",
        "train-onto-data",
        "spec-onto-spec",
    ],
)
def test_force_never_replaces_an_input(folder: Path, args: list[str], victim: str) -> None:
    line = _refused(folder, args, victim)
    assert "is an input" in line or "input" in line, line


def test_a_plan_protects_itself_and_every_item_input(folder: Path) -> None:
    (folder / "self.yaml").write_text(
        "format_version: 1\nitems:\n  - {name: x, a: a.safetensors, b: b.safetensors, output: o.safetensors, "
        "report: self.yaml, force: true}\n"
    )
    assert "item 'x': " in _refused(folder, ["batch", "self.yaml"], "self.yaml")
    torch.manual_seed(2)
    save_file(build_model("mlp", **ARGS).state_dict(), str(folder / "c.safetensors"))
    (folder / "chain.yaml").write_text(
        "format_version: 1\ndefaults: {force: true}\nitems:\n"
        "  - {name: x, a: a.safetensors, b: b.safetensors, output: c.safetensors}\n"
        "  - {name: y, a: c.safetensors, b: b.safetensors, output: c2.safetensors}\n"
    )
    line = _refused(folder, ["batch", "chain.yaml"], "c.safetensors")
    assert "item 'x': " in line and "input" in line


def test_sizes_from_files_are_bounded(folder: Path) -> None:
    rec = folder / "rec.safetensors"
    state = build_model("mlp", **ARGS).state_dict()
    save_file(
        state,
        str(rec),
        metadata={"rebasin.arch": "mlp", "rebasin.arch_args": json.dumps({**ARGS, "depth": 1e8})},
    )
    assert _refused(folder, ["permute", "rec.safetensors", "-o", "o.safetensors"], "rec.safetensors") == (
        "error: rec.safetensors: rebasin.arch_args: 'depth' is 100000000.0, larger than anything the "
        "checkpoint's tensors hold (largest dimension 32)"
    )
    import transformers as t

    m = t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16))
    for key, value, line in (
        ("n_layer", 100000000, "config.json: 'n_layer' is 100000000, but the checkpoint holds 2 layers"),
        (
            "n_positions",
            2000000000,
            "config.json: 'n_positions' is 2000000000, larger than anything the checkpoint's tensors hold (largest dimension 128)",
        ),
    ):
        d = folder / key
        m.save_pretrained(d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        assert (
            _refused(folder, ["permute", key, "-o", "out"], f"{key}/config.json") == f"error: {key}: {line}"
        )
    save_file({"e": torch.zeros(200000, 0), "f": torch.zeros(0, 200000)}, str(folder / "empty.safetensors"))
    line = _refused(
        folder,
        ["merge", "empty.safetensors", "empty.safetensors", "-o", "o.safetensors"],
        "empty.safetensors",
    )
    assert (
        line == "error: empty.safetensors: no tensor with units to permute (only scalars and empty tensors)"
    )


def test_names_are_shown_as_written(tmp_path: Path) -> None:
    f = tmp_path / "m.safetensors"
    save_file(
        {"x[/bold]y": torch.zeros(2), "a\x1b[31mred": torch.zeros(1)},
        str(f),
        metadata={"note": "see [/] here"},
    )
    code, stdout, err = run("inspect", f)
    assert code == 0, err
    assert "x[/bold]y" in stdout and "see [/] here" in stdout
    assert "\x1b" not in stdout and "a\\x1b[31mred" in stdout


def test_a_bracketed_output_path_is_printed_as_written(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = tmp_path / "a.safetensors"
    save_file(build_model("mlp", **ARGS).state_dict(), str(a))
    out = tmp_path / "out[v2].safetensors"
    code, _, err = run("merge", a, a, "-o", out, "--method", "weight")
    assert code == 0, err
    assert f"wrote merged: {out}" in err.replace("\n", "")


def test_parsers_never_end_in_an_unexpected_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    deep.mkdir()
    save_file({"w": torch.zeros(2)}, str(deep / "model.safetensors"))
    (deep / "config.json").write_text("[" * 100000 + "]" * 100000)
    code, _, err = run("inspect", deep)
    assert (
        code == 2
        and err.splitlines()[0]
        == f"error: {deep / 'config.json'}: cannot parse config.json (nested too deeply)"
    )
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    dup = header[:-1] + ', "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (tmp_path / "dup.safetensors").write_bytes(struct.pack("<Q", len(dup)) + dup.encode() + bytes(4))
    code, _, err = run("inspect", tmp_path / "dup.safetensors")
    assert code == 2 and err.splitlines()[0] == (
        f"error: {tmp_path / 'dup.safetensors'}: the safetensors header repeats the key 'w' (a tensor named twice)"
    )
    torch.save({"w": torch.eye(3).to_sparse()}, tmp_path / "sparse.pt")
    code, _, err = run("inspect", tmp_path / "sparse.pt")
    assert code == 2 and err.splitlines()[0] == (
        f"error: {tmp_path / 'sparse.pt'}: tensor 'w' is stored sparse_coo, not dense; rebasin reads dense tensors only"
    )


def test_long_messages_are_capped() -> None:
    from rebasin.report.render import one_line

    text = one_line("x" * 5000)
    assert text.endswith("... (3000 more characters)") and len(text) < 2100


def test_a_non_utf8_file_name_is_read(tmp_path: Path) -> None:
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/n\xff\xfe.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "ok.safetensors"))
    os.rename(tmp_path / "ok.safetensors", name)
    code, stdout, err = run("inspect", name)
    assert code == 0, err
    assert "1 tensors" in stdout


def test_many_plan_problems_are_capped(tmp_path: Path) -> None:
    items = "".join(
        f"  - {{name: i{i}, a: nope{i}.safetensors, b: x.safetensors, output: o{i}.safetensors}}\n"
        for i in range(2000)
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text("format_version: 1\nitems:\n" + items)
    code, _, err = run("batch", plan)
    assert code == 2
    line = err.splitlines()[0]
    assert line.endswith("and 3990 more problems") and len(line) < 2100


def test_a_failed_report_puts_every_output_back(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A later output that fails undoes the earlier ones: outputs the run created are removed,
    replaced ones (a file, a folder) get their previous contents back; the error names the path."""
    import errno

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("rebasin.commands.stages.write_report", full)
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    out, rep = folder / "m.safetensors", folder / "r.json"
    code, stdout, err = run("merge", a, b, "-o", out, "--report", rep, "--method", "weight")
    assert code == 2 and stdout == ""
    assert err.splitlines() == [
        f"error: {rep}: cannot write the report (No space left on device)",
        "hint: every output of this run was put back as it was",
    ]
    assert not out.exists() and not rep.exists()
    # replaced outputs: a file and a folder (with its files) come back as they were
    out.write_bytes(b"old model")
    rep.write_text("old report")
    code, _, _ = run("merge", a, b, "-o", out, "--report", rep, "--method", "weight", "--force")
    assert code == 2
    assert out.read_bytes() == b"old model" and rep.read_text() == "old report"
    folder_out = folder / "mdir"
    (folder_out / "sub").mkdir(parents=True)
    (folder_out / "model.safetensors").write_bytes(b"old")
    (folder_out / "sub" / "x.txt").write_text("keep")
    code, _, _ = run("merge", a, b, "-o", folder_out, "--report", rep, "--method", "weight", "--force")
    assert code == 2
    assert (folder_out / "model.safetensors").read_bytes() == b"old"
    assert (folder_out / "sub" / "x.txt").read_text() == "keep"
    assert not [p for p in folder.iterdir() if p.name.startswith(".rebasin-")]
