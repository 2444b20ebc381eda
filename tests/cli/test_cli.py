"""The command line end to end: outputs, reports, determinism, and every bad-input path with its
exact message, exit code 2 and no output file left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from helpers import expect_error, no_leftovers, run
from safetensors import safe_open
from safetensors.torch import load_file

from rebasin.models import build_model


def test_merge_writes_mean_of_a_and_permuted_b(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    out, perm, rep = (
        tmp_path / "merged.safetensors",
        tmp_path / "pb.safetensors",
        tmp_path / "r.json",
    )
    code, stdout, stderr = run("merge", a, b, "-o", out, "--save-permuted", perm, "--report", rep)
    assert code == 0, stderr
    assert stdout == ""
    assert "wrote merged" in stderr
    ma, mb, mm = load_file(a), load_file(perm), load_file(out)
    for k in ma:
        torch.testing.assert_close(mm[k], 0.5 * (ma[k] + mb[k]))
    report = json.loads(rep.read_text())
    assert report["schema"] == 1
    assert report["spec"]["source"] == "inferred:mlp"
    assert report["spec"]["fixed"] == ["net.6.bias"]
    assert set(report["match"]["groups"]) == {"P_net.0", "P_net.2", "P_net.4"}
    assert report["match"]["objective"] >= report["match"]["objective_identity"]
    assert report["distance"]["l2_after"] <= report["distance"]["l2_before"]
    assert report["inputs"]["a"]["parameters"] == sum(v.numel() for v in ma.values())
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["rebasin.method"] == "auto"
    assert meta["rebasin.alpha"] == "0.5"
    assert meta["rebasin.input_a.sha256"] == report["inputs"]["a"]["sha256"]


def test_merge_json_goes_to_stdout_alone(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    code, stdout, stderr = run("merge", a, b, "-o", tmp_path / "m.safetensors", "--json")
    assert code == 0
    assert stderr == ""
    report = json.loads(stdout)
    assert report["command"] == "merge"
    assert report["output"]["files"]["merged"] == [str(tmp_path / "m.safetensors")]


def test_alpha_endpoints(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    run("merge", a, b, "-o", tmp_path / "a0.safetensors", "--alpha", "0")
    run(
        "merge",
        a,
        b,
        "-o",
        tmp_path / "a1.safetensors",
        "--alpha",
        "1",
        "--save-permuted",
        tmp_path / "pb.safetensors",
    )
    for k, v in load_file(a).items():
        assert torch.equal(load_file(tmp_path / "a0.safetensors")[k], v)
    pb = load_file(tmp_path / "pb.safetensors")
    for k, v in load_file(tmp_path / "a1.safetensors").items():
        assert torch.equal(v, pb[k])


def test_same_seed_gives_byte_identical_output(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.safetensors"
        assert run("merge", a, b, "-o", out, "--seed", "3", "--method", "weight", "--restarts", "2")[0] == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_dtypes_are_preserved(write_st: Callable[..., Path], tmp_path: Path) -> None:
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sd = build_model("mlp", in_features=8, hidden=16, depth=2).state_dict()
        sd = {k: v.to(torch.bfloat16 if "weight" in k else torch.float16) for k, v in sd.items()}
        paths.append(write_st(sd, f"h{seed}.safetensors"))
    out = tmp_path / "m.safetensors"
    assert run("merge", *paths, "-o", out)[0] == 0
    merged = load_file(out)
    assert merged["net.0.weight"].dtype == torch.bfloat16
    assert merged["net.0.bias"].dtype == torch.float16


def test_sharded_output_round_trips(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    single, sharded = tmp_path / "single.safetensors", tmp_path / "sharded.safetensors"
    assert run("merge", a, b, "-o", single)[0] == 0
    code, _, err = run("merge", a, b, "-o", sharded, "--shard-size", "2KB")
    assert code == 0, err
    index = tmp_path / "sharded.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"sharded-00001-of-{len(shards):05d}.safetensors"
    assert not sharded.exists()
    # the index is a valid input and holds the same tensors
    out2 = tmp_path / "again.safetensors"
    assert run("permute", index, "-o", out2, "--seed", "0")[0] == 0
    from rebasin.checkpoint import load_checkpoint

    ck = load_checkpoint(index)
    ref = load_file(single)
    assert set(ck.state) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ck.state[k], v)


def test_directory_output_and_input(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    out = tmp_path / "merged_dir"
    code, _, err = run("merge", a, b, "-o", out, "--shard-size", "3KB")
    assert code == 0, err
    assert (out / "model.safetensors.index.json").exists()
    code, stdout, _ = run("inspect", out, "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["family"] == "mlp"
    assert info["metadata"]["rebasin.command"] == "merge"


def test_permute_preserves_function(write_st: Callable[..., Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    src = write_st(model.state_dict(), "r.safetensors")
    out = tmp_path / "p.safetensors"
    code, _, err = run("permute", src, "--seed", "4", "-o", out)
    assert code == 0, err
    other = build_model("resnet20").eval()
    other.load_state_dict(load_file(out))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(load_file(out)["conv1.weight"], model.state_dict()["conv1.weight"])


def test_spec_export_and_reuse(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    spec_path = tmp_path / "spec.yaml"
    code, stdout, err = run("spec", a, "-o", spec_path)
    assert code == 0, err
    assert "P_net.0" in stdout and "left fixed: net.6.bias" in stdout  # results on stdout, for pipes
    data = yaml.safe_load(spec_path.read_text())
    assert data["format_version"] == 1
    assert data["groups"]["P_net.2"]["members"] == [
        ["net.2.weight", 0],
        ["net.2.bias", 0],
        ["net.4.weight", 1],
    ]
    assert data["fixed"] == ["net.6.bias"]
    out1, out2 = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    assert run("merge", a, b, "-o", out1)[0] == 0
    assert run("merge", a, b, "-o", out2, "--spec", spec_path)[0] == 0
    t1, t2 = load_file(out1), load_file(out2)
    assert all(torch.equal(t1[k], t2[k]) for k in t1)


def test_hand_written_spec_with_fewer_groups(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "format_version: 1\ngroups:\n  hidden1: {size: 32, members: [[net.0.weight, 0], [net.0.bias, 0], [net.2.weight, 1]]}\n"
    )
    code, stdout, _ = run("merge", a, b, "-o", tmp_path / "m.safetensors", "--spec", spec_path, "--json")
    assert code == 0
    rep = json.loads(stdout)
    assert list(rep["match"]["groups"]) == ["hidden1"]
    assert "net.4.weight" in rep["spec"]["fixed"]
    merged, ma, mb = load_file(tmp_path / "m.safetensors"), load_file(a), load_file(b)
    torch.testing.assert_close(merged["net.4.weight"], 0.5 * (ma["net.4.weight"] + mb["net.4.weight"]))


def test_inspect_table(mlp_pair: tuple[Path, Path]) -> None:
    code, stdout, _ = run("inspect", mlp_pair[0])
    assert code == 0
    assert "net.0.weight" in stdout and "(32, 20)" in stdout  # results on stdout, for pipes
    assert "architecture: mlp (3 groups)" in stdout


def test_inspect_counts_integer_buffers_apart(write_st: Callable[..., Path]) -> None:
    state = {
        "w": torch.zeros(3, 4),
        "position_ids": torch.arange(8)[None],
        "bn.num_batches_tracked": torch.tensor(5),
    }
    code, stdout, _ = run("inspect", write_st(state, "p.safetensors"), "--json")
    assert code == 0
    info = json.loads(stdout)["input"]
    assert info["parameters"] == 12
    assert info["integer_elements"] == 9


def test_pt_checkpoints_and_wrapped_state_dicts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = build_model("mlp", in_features=6, hidden=8, depth=2).state_dict()
    torch.manual_seed(1)
    b = build_model("mlp", in_features=6, hidden=8, depth=2).state_dict()
    torch.save(a, tmp_path / "a.pt")
    torch.save({"state_dict": b, "epoch": 3}, tmp_path / "b.pth")
    code, _, err = run("merge", tmp_path / "a.pt", tmp_path / "b.pth", "-o", tmp_path / "m.safetensors")
    assert code == 0, err


def test_console_script_runs(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    exe = Path(sys.executable).parent / "rebasin"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rebasin"]
    r = subprocess.run(
        [*cmd, "merge", str(a), str(b), "-o", str(tmp_path / "m.safetensors"), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "CI": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["command"] == "merge"


# ------------------------------------------------------------------------------ bad input


def test_missing_file(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = mlp_pair
    missing = tmp_path / "nope.safetensors"
    expect_error(
        ["merge", a, missing, "-o", tmp_path / "o.safetensors"],
        f"{missing}: no such file or directory",
    )
    no_leftovers(tmp_path, "o.safetensors")


def test_not_a_checkpoint(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = mlp_pair
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    expect_error(
        ["merge", a, txt, "-o", tmp_path / "o.safetensors"],
        f"{txt}: not a checkpoint (expected .safetensors, *.safetensors.index.json, a directory of "
        "shards, or a .pt/.pth/.bin state dict)",
    )
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"this is not a safetensors file at all")
    expect_error(
        ["merge", a, fake, "-o", tmp_path / "o.safetensors"],
        f"{fake}: not a valid safetensors file (header too large); it may be truncated or corrupted",
    )
    pt = tmp_path / "fake.pt"
    pt.write_bytes(b"garbage bytes")
    expect_error(
        ["inspect", pt],
        f"{pt}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)",
    )
    no_leftovers(tmp_path, "o.safetensors")


def test_truncated_and_corrupted_safetensors(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    data = b.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    expect_error(
        ["merge", a, trunc, "-o", tmp_path / "o.safetensors"],
        f"{trunc}: not a valid safetensors file (incomplete metadata, file not fully covered); "
        "it may be truncated or corrupted",
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:8] + b"{garbage" + data[16:])
    code, _, err = run("merge", a, bad, "-o", tmp_path / "o.safetensors")
    assert code == 2
    assert err.startswith(f"error: {bad}: not a valid safetensors file (")
    assert err.splitlines()[0].endswith("it may be truncated or corrupted")
    no_leftovers(tmp_path, "o.safetensors")


def test_shape_mismatch(write_st: Callable[..., Path], tmp_path: Path) -> None:
    a = write_st(build_model("mlp", in_features=20, hidden=32).state_dict(), "a.safetensors")
    b = write_st(build_model("mlp", in_features=20, hidden=16).state_dict(), "b.safetensors")
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors"],
        f"{b}: tensor 'net.0.bias' has shape (16), A has (32)",
    )
    no_leftovers(tmp_path, "o.safetensors")


def test_missing_tensors(write_st: Callable[..., Path], tmp_path: Path) -> None:
    sd = build_model("mlp", in_features=20, hidden=32).state_dict()
    a = write_st(sd, "a.safetensors")
    b = write_st({k: v for k, v in sd.items() if k != "net.6.bias"}, "b.safetensors")
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors"],
        f"{b}: tensors missing that A has: 'net.6.bias'",
    )
    expect_error(
        ["merge", b, a, "-o", tmp_path / "o.safetensors"],
        f"{b}: tensors missing that B has: 'net.6.bias'",
    )
    no_leftovers(tmp_path, "o.safetensors")


def test_integer_weights(write_st: Callable[..., Path], tmp_path: Path) -> None:
    sd = build_model("mlp", in_features=20, hidden=32).state_dict()
    a = write_st(sd, "a.safetensors")
    b = write_st({**sd, "net.2.weight": sd["net.2.weight"].round().long()}, "b.safetensors")
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors"],
        f"{b}: tensor 'net.2.weight' has integer dtype int64; weights must be floating point",
    )
    no_leftovers(tmp_path, "o.safetensors")


@pytest.mark.parametrize(("value", "word"), [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights(write_st: Callable[..., Path], tmp_path: Path, value: float, word: str) -> None:
    sd = build_model("mlp", in_features=20, hidden=32).state_dict()
    a = write_st(sd, "a.safetensors")
    w = sd["net.2.weight"].clone()
    w[3, 4] = value
    b = write_st({**sd, "net.2.weight": w}, "b.safetensors")
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors"],
        f"{b}: tensor 'net.2.weight' contains {word} values",
    )
    no_leftovers(tmp_path, "o.safetensors")


def test_unrecognized_architecture(write_st: Callable[..., Path], tmp_path: Path) -> None:
    # Meta's original LLaMA naming: not the Hugging Face names the llama family reads
    shapes = {
        "tok_embeddings.weight": (50, 32),
        "layers.0.attention.wq.weight": (32, 32),
        "layers.0.attention.wk.weight": (32, 32),
        "layers.0.attention.wv.weight": (32, 32),
        "layers.0.attention.wo.weight": (32, 32),
        "layers.0.feed_forward.w1.weight": (48, 32),
        "layers.0.feed_forward.w2.weight": (32, 48),
        "layers.0.feed_forward.w3.weight": (48, 32),
        "layers.0.attention_norm.weight": (32,),
        "layers.0.ffn_norm.weight": (32,),
        "norm.weight": (32,),
        "output.weight": (50, 32),
    }
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    a = write_st(sd, "a.safetensors")
    b = write_st(sd, "b.safetensors")
    code, _, err = run("merge", a, b, "-o", tmp_path / "o.safetensors")
    assert code == 2
    line, hint = err.splitlines()[:2]
    assert line == (
        f"error: {a}: unrecognized architecture (12 tensors: 9 linear, 3 norm); closest families: "
        "llama (83% of names fit; no 'layers.N.self_attn.q_proj.weight'); mlp (75% of names fit; "
        "'layers.0.attention.wk.weight' belongs to a residual or attention architecture)"
    )
    assert hint == (
        "hint: write a spec file and pass --spec spec.yaml (see docs/writing-a-spec.md), "
        "or pass --model MODULE:FACTORY to trace the model"
    )
    no_leftovers(tmp_path, "o.safetensors")


def test_unknown_spec_family_suggests(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors", "--spec", "resnt"],
        "unknown spec family 'resnt' (known: resnet, mlp, vgg, transformer, gpt2, llama, bert, vit, or a spec file)",
        "did you mean 'resnet'?",
    )


def test_output_equal_to_input(mlp_pair: tuple[Path, Path]) -> None:
    a, b = mlp_pair
    before = a.read_bytes()
    expect_error(
        ["merge", a, b, "-o", a, "--force"],
        f"{a}: output path is an input; refusing to overwrite it",
    )
    assert a.read_bytes() == before


def test_existing_output_needs_force(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    expect_error(["merge", a, b, "-o", out], f"{out}: already exists", "pass --force to overwrite")
    assert out.read_bytes() == b"keep me"
    assert run("merge", a, b, "-o", out, "--force")[0] == 0
    assert out.read_bytes() != b"keep me"


def test_spec_file_with_unknown_keys_lists_every_problem(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    spec = tmp_path / "spec.yaml"
    spec.write_text("format_version: 1\nextra: 1\ngroups:\n  P1: {sise: 32, members: [[net.0.weight, 0]]}\n")
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors", "--spec", spec],
        f"{spec}: unknown key 'extra' at top level; group 'P1': unknown key 'sise'; "
        "group 'P1': 'size' must be a positive integer",
        "see docs/spec-format.md",
    )
    no_leftovers(tmp_path, "o.safetensors")


def test_spec_file_that_does_not_fit(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "format_version: 1\ngroups:\n  P1: {size: 30, members: [[net.0.weight, 0], [net.9.weight, 1]]}\n"
    )
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors", "--spec", spec],
        f"{spec}: tensor 'net.0.weight' axis 0 has length 32, group 'P1' has size 30; "
        "tensor 'net.9.weight' named in the spec is not in the checkpoint",
    )


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    import argparse

    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, p)
    expect_error(
        ["inspect", p],
        f"{p}: refusing to load: the file holds Python objects other than tensors "
        "(loaded with weights_only=True)",
        "convert it to a plain state dict or to .safetensors where it was made",
    )


def test_bad_alpha(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    expect_error(
        ["merge", a, b, "-o", tmp_path / "o.safetensors", "--alpha", "1.5"],
        "--alpha must lie in [0, 1], got 1.5",
    )


def test_non_finite_weights_in_both_name_the_first(write_st: Callable[..., Path], tmp_path: Path) -> None:
    """The two checkpoints are scanned at once; the error is still the first checkpoint's."""
    sd = build_model("mlp", in_features=20, hidden=32).state_dict()
    bad_a, bad_b = sd["net.2.weight"].clone(), sd["net.0.weight"].clone()
    bad_a[-1, -1], bad_b[0, 0] = float("inf"), float("nan")
    a = write_st({**sd, "net.2.weight": bad_a}, "a.safetensors")
    b = write_st({**sd, "net.0.weight": bad_b}, "b.safetensors")
    for _ in range(3):
        expect_error(
            ["merge", a, b, "-o", tmp_path / "o.safetensors"],
            f"{a}: tensor 'net.2.weight' contains Inf values",
        )
    no_leftovers(tmp_path, "o.safetensors")
