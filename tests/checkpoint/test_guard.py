"""The output guard: never an input, never two outputs on one path, never an existing file without
--force, never a file where a folder is; every problem found before any work starts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import expect_error, no_leftovers, run
from safetensors.torch import load_file, save_file

from rebasin.checkpoint.atomic import umask


def test_a_shard_name_of_the_output_that_is_an_input(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    shard = tmp_path / "m-00001-of-00002.safetensors"
    shard.write_bytes(a.read_bytes())
    before = shard.read_bytes()
    expect_error(
        ["merge", shard, b, "-o", tmp_path / "m.safetensors", "--shard-size", "2KB", "--force"],
        f"{tmp_path / 'm.safetensors'}: writing it would replace input file '{shard}'; refusing",
    )
    assert shard.read_bytes() == before


def test_report_on_the_output_path(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    out = tmp_path / "m.safetensors"
    expect_error(
        ["merge", a, b, "-o", out, "--report", out],
        f"{out}: --report and -o name the same path",
    )
    assert not out.exists()


def test_plot_does_not_overwrite_its_svg(trained_mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trained_mlp_pair
    svg = tmp_path / "p.svg"
    svg.write_text("mine")
    expect_error(
        ["barrier", a, b, "--data", "mnist1d", "--plot", tmp_path / "p.png"],
        f"{tmp_path / 'p.png'}: already exists",
        "pass --force to overwrite",
    )
    assert svg.read_text() == "mine"


def test_folder_output_holding_an_input_is_refused_even_with_force(tmp_path: Path) -> None:
    d = tmp_path / "out"
    d.mkdir()
    torch.manual_seed(0)
    a = d / "a.safetensors"
    save_file(
        {"net.0.weight": torch.randn(4, 3), "net.0.bias": torch.randn(4), "net.2.weight": torch.randn(2, 4)},
        str(a),
    )
    b = tmp_path / "b.safetensors"
    save_file({k: v + 1 for k, v in load_file(a).items()}, str(b))
    before = a.read_bytes()
    expect_error(
        ["merge", a, b, "-o", d, "--force"],
        f"{d}: the folder holds input file '{a}'; refusing to replace it",
    )
    assert a.read_bytes() == before


def test_every_problem_is_listed_at_once(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    out, rep = tmp_path / "m.safetensors", tmp_path / "r.json"
    out.write_text("old")
    rep.mkdir()
    expect_error(
        ["merge", a, b, "-o", out, "--report", rep],
        f"{out}: already exists; {rep}: is a directory; give a file name",
    )


def test_file_output_onto_a_directory(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    d = tmp_path / "x.safetensors"
    d.mkdir()
    expect_error(["merge", a, b, "-o", d, "--force"], f"{d}: is a directory; give a file name")


def test_an_existing_empty_directory_takes_a_folder_output(
    mlp_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = mlp_pair
    d = tmp_path / "merged"
    d.mkdir()
    code, _, err = run("merge", a, b, "-o", d)
    assert code == 0, err
    assert (d / "model.safetensors").exists()


def test_missing_output_folder(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    out = tmp_path / "nope" / "m.safetensors"
    expect_error(["merge", a, b, "-o", out], f"{out}: output directory does not exist")


def test_os_errors_on_outputs_are_one_line(
    mlp_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = mlp_pair
    out = tmp_path / "m.safetensors"

    def refuse(src: object, dst: object) -> None:
        raise OSError(30, "Read-only file system", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    expect_error(["merge", a, b, "-o", out], f"{out}: read-only file system")
    no_leftovers(tmp_path, "m.safetensors")


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_follow_the_umask(mlp_pair: tuple[Path, Path], tmp_path: Path, mask: int) -> None:
    a, b = mlp_pair
    old = os.umask(mask)
    try:
        out, rep, d = tmp_path / "m.safetensors", tmp_path / "r.json", tmp_path / "folder"
        assert run("merge", a, b, "-o", out, "--report", rep)[0] == 0
        assert run("merge", a, b, "-o", d, "--shard-size", "2KB")[0] == 0
        for f in (out, rep, d / "model.safetensors.index.json", d / "model-00001-of-00002.safetensors"):
            if f.exists():
                assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask(), f
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
    finally:
        os.umask(old)


def test_stale_temporary_files_of_dead_runs_are_removed(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    stale = tmp_path / ".rebasin-tmp-999999999-dead.tmp"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / f".rebasin-tmp-{os.getppid()}-live.tmp"
    live.write_bytes(b"y")
    assert run("merge", a, b, "-o", tmp_path / "m.safetensors")[0] == 0
    assert not stale.exists()
    assert live.exists()  # a live process's work is left alone


def test_plan_outputs_are_checked_before_any_item_runs(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "format_version: 1\nitems:\n"
        f"  - {{name: one, a: {a}, b: {b}, output: m.safetensors}}\n"
        f"  - {{name: two, a: {a}, b: {b}, output: m.safetensors}}\n"
        f"  - {{name: three, a: {a}, b: {b}, output: {a.name}}}\n"
    )
    code, _, err = run("batch", plan)
    assert code == 2
    line = err.splitlines()[0]
    assert "item 'two': output '" in line and "is also written by item 'one'" in line
    assert "item 'three':" in line and "output path is an input" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_sharded_overwrite_removes_the_old_set(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    out = tmp_path / "m.safetensors"
    assert run("merge", a, b, "-o", out, "--shard-size", "1KB")[0] == 0
    many = sorted(p.name for p in tmp_path.glob("m-*.safetensors"))
    assert len(many) > 2
    assert run("merge", a, b, "-o", out, "--shard-size", "3KB", "--force")[0] == 0
    index = json.loads((tmp_path / "m.safetensors.index.json").read_text())
    names = set(index["weight_map"].values())
    assert {p.name for p in tmp_path.glob("m-*.safetensors")} == names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rebasin-")]


# ----------------------------------------------------------------- what --force may replace


def _folder_merge(mlp_pair: tuple[Path, Path], out: Path, *more: str) -> tuple[int, str]:
    from helpers import run

    code, _, err = run("merge", *mlp_pair, "-o", out, "--method", "weight", "--force", *more)
    return code, err


def test_force_refuses_an_old_folder_it_could_not_remove(
    mlp_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing output folder holding a folder that cannot be changed (read-only, as a
    non-root user sees it) is refused before any work, naming the output; it stays as it was."""
    out = tmp_path / "out"
    (out / "tok").mkdir(parents=True)
    (out / "tok" / "vocab.txt").write_text("old")
    locked = out / "tok"
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == locked else real(p, m))
    code, err = _folder_merge(mlp_pair, out)
    assert code == 2
    assert err.splitlines()[0] == (
        f"error: {out}: '{locked}' cannot be changed (permission denied), so the old folder cannot be replaced"
    )
    assert (out / "tok" / "vocab.txt").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["tok"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may change read-only folders")
def test_force_refuses_a_read_only_folder_as_a_user(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "tok").mkdir(parents=True)
    (out / "tok" / "vocab.txt").write_text("old")
    (out / "tok").chmod(0o555)
    try:
        code, err = _folder_merge(mlp_pair, out)
        assert code == 2 and "cannot be changed (permission denied)" in err
        assert (out / "tok" / "vocab.txt").read_text() == "old"
    finally:
        (out / "tok").chmod(0o755)


def test_force_refuses_a_mount_point(
    mlp_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "mnt"
    out.mkdir()
    (out / "x").write_text("keep")
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    code, err = _folder_merge(mlp_pair, out)
    assert code == 2
    assert (
        err.splitlines()[0]
        == f"error: {out}: is a mount point, which cannot be replaced; write to a new path inside it"
    )
    assert (out / "x").read_text() == "keep"


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_force_replaces_only_files_and_folders(
    mlp_pair: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    out = tmp_path / "m.safetensors"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        (tmp_path / "real.safetensors").write_bytes(b"old")
        out.symlink_to(tmp_path / "real.safetensors")
    code, err = _folder_merge(mlp_pair, out)
    assert code == 2 and err.startswith(f"error: {out}: ")
    assert ("symbolic link" in err) if kind == "symlink" else ("not a regular file or folder" in err)
    assert os.path.lexists(out)


def test_folder_outputs_carry_dotfiles_and_linked_files(tmp_path: Path) -> None:
    """A model folder's copy carries dotfiles (never .git/ or caches) and what symbolic links
    point to inside the folder or its hub cache's blobs; links elsewhere are left out."""
    from rebasin.checkpoint.save import copy_model_files

    cache = tmp_path / "models--org--m"
    snap, blobs = cache / "snapshots" / "abc", cache / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "123").write_text('{"model_type": "bert"}')
    (snap / "config.json").symlink_to(blobs / "123")
    (snap / ".gitattributes").write_text("*.safetensors filter=lfs")
    (snap / ".git").mkdir()
    (snap / ".git" / "HEAD").write_text("ref")
    (snap / "__pycache__").mkdir()
    (tmp_path / "secret.txt").write_text("no")
    (snap / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (snap / "vocab.txt").write_text("a\nb")
    (snap / "alias.txt").symlink_to(snap / "vocab.txt")
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_model_files(snap, out)
    assert sorted(copied) == [".gitattributes", "alias.txt", "config.json", "vocab.txt"]
    assert (out / "config.json").read_text() == '{"model_type": "bert"}' and not (
        out / "config.json"
    ).is_symlink()
    assert not (out / ".git").exists() and not (out / "leak.txt").exists()
