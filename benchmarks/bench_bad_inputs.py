"""Bad inputs, tried as a new user and as an attacker would: how many end in one error line (exit 2),
a traceback, a wrong exit code, a leftover file, or code that ran.

    python benchmarks/bench_bad_inputs.py [--fuzz N]

Each case runs the real command line in a subprocess, in a fresh folder; a marker file tells whether
untrusted code ran. ``--fuzz N`` adds N corrupted safetensors headers (in-process, faster)."""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from rebasin.models import build_model


def setup(d: Path) -> dict[str, str]:
    torch.manual_seed(0)
    a = build_model("mlp", in_features=32, hidden=16, num_classes=4).state_dict()
    torch.manual_seed(1)
    b = build_model("mlp", in_features=32, hidden=16, num_classes=4).state_dict()
    save_file(a, str(d / "a.safetensors"))
    save_file(b, str(d / "b.safetensors"))
    evil = {
        "rebasin.arch": "subprocess:run",
        "rebasin.arch_args": json.dumps({"args": "touch marker", "shell": True}),
    }
    save_file(a, str(d / "evil.safetensors"), metadata=evil)
    (d / "idx").mkdir()
    (d / "idx" / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../a.safetensors"}}))
    (d / "abs.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "/etc/passwd"}}))
    os.mkfifo(d / "fifo.safetensors")
    (d / "hook.py").write_text("def boom(**kw):\n    raise RuntimeError('boom')\n")
    (d / "syntax.py").write_text("def f(:\n")
    (d / "bomb.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
            for i in range(24)
        )
    )
    (d / "plan.yaml").write_text(
        "format_version: 1\nitems:\n"
        "  - {name: x, a: a.safetensors, b: b.safetensors, model: 'hook.py:boom', data: synthetic}\n"
    )
    (d / "steps.yaml").write_text(
        "format_version: 1\nitems:\n"
        "  - {name: x, a: a.safetensors, b: b.safetensors, data: synthetic, method: ste, steps: -5}\n"
    )
    (d / "rows.npz").write_bytes(b"")
    import numpy as np

    np.savez(d / "rows.npz", x=np.zeros((100, 32), np.float32), y=np.zeros(50, np.int64))
    (d / "ro").mkdir()
    (d / "exists.safetensors").write_text("keep")
    (d / "emptydir").mkdir()
    (d / "dir.safetensors").mkdir()
    # round two: inputs other than A and B, things that are not files, sizes, names, parsers
    (d / "s.yaml").write_text("format_version: 1\ngroups: {}\n")
    np.savez(d / "d.npz", x=np.zeros((10, 32), np.float32), y=np.zeros(10, np.int64))
    (d / "m.py").write_text("def make():\n    raise RuntimeError('never called')\n")
    os.mkfifo(d / "nul.safetensors")
    (d / "real.json").write_text("{}")
    (d / "link.json").symlink_to(d / "real.json")
    (d / "self.yaml").write_text(
        "format_version: 1\nitems:\n  - {name: x, a: a.safetensors, b: b.safetensors, output: o.safetensors, "
        "report: self.yaml, force: true}\n"
    )
    save_file(a, str(d / "c.safetensors"))  # a later item's input, an earlier item's output
    (d / "chain.yaml").write_text(
        "format_version: 1\ndefaults: {force: true}\nitems:\n"
        "  - {name: x, a: a.safetensors, b: b.safetensors, output: c.safetensors}\n"
        "  - {name: y, a: c.safetensors, b: b.safetensors, output: c2.safetensors}\n"
    )
    for name, cfg in (
        ("deep", "[" * 100000 + "]" * 100000),
        ("layers", '{"model_type": "gpt2", "n_layer": 100000000}'),
    ):
        (d / name).mkdir()
        save_file(a, str(d / name / "model.safetensors"))
        (d / name / "config.json").write_text(cfg)
    save_file({"x[/bold]y": torch.zeros(2), "a\x1b[31mred": torch.zeros(1)}, str(d / "markup.safetensors"),
              metadata={"note": "see [/] here"})  # fmt: skip
    save_file(
        a,
        str(d / "deep_args.safetensors"),
        metadata={"rebasin.arch": "mlp", "rebasin.arch_args": json.dumps({"in_features": 32, "depth": 1e8})},
    )
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    dup = header[:-1] + ', "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (d / "dup.safetensors").write_bytes(struct.pack("<Q", len(dup)) + dup.encode() + bytes(4))
    torch.save({"w": torch.eye(3).to_sparse()}, d / "sparse.pt")
    save_file({"e": torch.zeros(200000, 0), "f": torch.zeros(0, 200000)}, str(d / "empty.safetensors"))
    np.savez(d / "labels.npz", input_ids=np.zeros((8, 4), np.int64), labels=np.zeros((8, 1), np.int64))
    np.savez(d / "u64.npz", input_ids=np.zeros((8, 4), np.int64), labels=np.zeros(8, np.uint64))
    return {}


CASES: list[tuple[str, list[str], int]] = [
    (
        "metadata names code (barrier)",
        ["barrier", "evil.safetensors", "b.safetensors", "--data", "synthetic"],
        2,
    ),
    (
        "metadata names code (merge --data)",
        ["merge", "evil.safetensors", "b.safetensors", "-o", "o.safetensors", "--data", "synthetic"],
        2,
    ),
    ("metadata names code (spec --spec trace)", ["spec", "evil.safetensors", "--spec", "trace"], 2),
    ("index entry ../", ["inspect", "idx/m.safetensors.index.json"], 2),
    ("index entry absolute", ["inspect", "abs.safetensors.index.json"], 2),
    ("FIFO as checkpoint", ["inspect", "fifo.safetensors"], 2),
    ("output is input A", ["merge", "a.safetensors", "b.safetensors", "-o", "a.safetensors", "--force"], 2),
    ("output exists", ["merge", "a.safetensors", "b.safetensors", "-o", "exists.safetensors"], 2),
    (
        "--report equals -o",
        ["merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors", "--report", "o.safetensors"],
        2,
    ),
    ("-o is a directory", ["merge", "a.safetensors", "b.safetensors", "-o", "dir.safetensors", "--force"], 2),
    ("output folder missing", ["merge", "a.safetensors", "b.safetensors", "-o", "nope/o.safetensors"], 2),
    (
        "model hook raises",
        ["barrier", "a.safetensors", "b.safetensors", "--model", "hook.py:boom", "--data", "synthetic"],
        2,
    ),
    (
        "model hook syntax error",
        ["barrier", "a.safetensors", "b.safetensors", "--model", "syntax.py:f", "--data", "synthetic"],
        2,
    ),
    (
        "--device bogus",
        ["merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors", "--device", "bogus"],
        2,
    ),
    (
        "--device cuda (CPU build)",
        ["merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors", "--device", "cuda"],
        2,
    ),
    (
        "YAML alias bomb",
        ["merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors", "--spec", "bomb.yaml"],
        2,
    ),
    (
        "--max-barrier nan",
        [
            "barrier",
            "a.safetensors",
            "b.safetensors",
            "--model",
            "mlp",
            "--model-args",
            '{"in_features": 32, "hidden": 16, "num_classes": 4}',
            "--data",
            "synthetic",
            "--max-barrier",
            "nan",
        ],
        2,
    ),
    (
        "x and y rows differ",
        [
            "barrier",
            "a.safetensors",
            "b.safetensors",
            "--model",
            "mlp",
            "--model-args",
            '{"in_features": 32, "hidden": 16, "num_classes": 4}',
            "--data",
            "rows.npz",
        ],
        2,
    ),
    ("plan steps -5", ["batch", "steps.yaml"], 2),
    ("plan names code", ["batch", "plan.yaml"], 2),
    (
        "--restarts 0",
        ["merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors", "--restarts", "0"],
        2,
    ),
    (
        "--restarts abc",
        ["merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors", "--restarts", "abc"],
        2,
    ),
    (
        "option of another method",
        [
            "merge",
            "a.safetensors",
            "b.safetensors",
            "-o",
            "o.safetensors",
            "--method",
            "sinkhorn",
            "--restarts",
            "5",
        ],
        2,
    ),
    (
        "unknown method",
        ["merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors", "--method", "nope"],
        2,
    ),
    (
        "--shard-size lots",
        ["merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors", "--shard-size", "lots"],
        2,
    ),
    ("--alpha 2", ["merge", "a.safetensors", "b.safetensors", "-o", "o.safetensors", "--alpha", "2"], 2),
    # round two
    (
        "--report onto --spec, --force",
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
        2,
    ),
    (
        "-o onto --data, --force",
        ["merge", "a.safetensors", "b.safetensors", "-o", "d.npz", "--data", "d.npz", "--force"],
        2,
    ),
    (
        "--report onto --model file, --force",
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
        2,
    ),
    ("train -o onto its --data, --force", ["train", "--data", "d.npz", "-o", "d.npz", "--force"], 2),
    (
        "spec -o onto its --spec, --force",
        ["spec", "a.safetensors", "--spec", "s.yaml", "-o", "s.yaml", "--force"],
        2,
    ),
    ("plan item reports onto the plan", ["batch", "self.yaml"], 2),
    ("plan output is a later item's input", ["batch", "chain.yaml"], 2),
    (
        "-o is a FIFO, --force",
        ["merge", "a.safetensors", "b.safetensors", "-o", "nul.safetensors", "--force"],
        2,
    ),
    (
        "--report is a symlink, --force",
        [
            "merge",
            "a.safetensors",
            "b.safetensors",
            "-o",
            "o.safetensors",
            "--report",
            "link.json",
            "--force",
        ],
        2,
    ),
    ("config.json 100,000-deep", ["permute", "deep", "-o", "out"], 2),
    ("config.json n_layer 1e8", ["permute", "layers", "-o", "out"], 2),
    ("arch_args depth 1e8", ["permute", "deep_args.safetensors", "-o", "o.safetensors"], 2),
    ("safetensors header repeats a name", ["inspect", "dup.safetensors"], 2),
    ("sparse tensor in .pt", ["inspect", "sparse.pt"], 2),
    (
        "empty [200000, 0] tensors",
        ["merge", "empty.safetensors", "empty.safetensors", "-o", "o.safetensors"],
        2,
    ),
    (
        "labels (N, 1)",
        ["barrier", "a.safetensors", "b.safetensors", "--model", "mlp", "--data", "labels.npz"],
        2,
    ),
    (
        "labels uint64",
        ["barrier", "a.safetensors", "b.safetensors", "--model", "mlp", "--data", "u64.npz"],
        2,
    ),
    ("markup in names (valid file)", ["inspect", "markup.safetensors"], 0),
]


def snapshot(d: Path) -> dict[str, tuple[bool, int, int]]:
    """Every entry of the folder: (is a regular file, size, mtime)."""
    out = {}
    for p in d.iterdir():
        st = p.lstat()
        out[p.name] = (p.is_file() and not p.is_symlink(), st.st_size, st.st_mtime_ns)
    return out


def classify(d: Path, before: set[str], code: int, err: str, want: int, was: dict | None = None) -> str:
    if (d / "marker").exists():
        return "code ran"
    if was is not None and any(snapshot(d).get(k) != v for k, v in was.items()):
        return "input changed"
    if "Traceback" in err:
        return "traceback"
    if code != want:
        return "wrong exit code"
    left = {p.name for p in d.iterdir()} - before
    if left and want != 0:
        return "leftover file"
    if want == 0:
        return "ok (valid input)" if code == 0 and "Traceback" not in err else "other output"
    lines = err.strip().splitlines()
    if (
        lines
        and lines[0].startswith("error: ")
        and all(x.startswith(("error: ", "hint: ")) for x in lines)
        and len(lines[0]) <= 300
    ):
        return "one line"
    return "other output"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fuzz", type=int, default=0)
    args = ap.parse_args()
    tally: Counter[str] = Counter()
    for name, argv, want in CASES:
        with tempfile.TemporaryDirectory() as t:
            d = Path(t)
            setup(d)
            before, was = {p.name for p in d.iterdir()}, snapshot(d)
            r = subprocess.run(
                [sys.executable, "-m", "rebasin", *argv], cwd=d, capture_output=True, text=True, timeout=120
            )
            verdict = classify(d, before, r.returncode, r.stderr, want, was)
            tally[verdict] += 1
            print(
                f"{verdict:>16}  {name}: {r.stderr.strip().splitlines()[0] if r.stderr.strip() else ''}"[:160]
            )
    if args.fuzz:
        from typer.testing import CliRunner

        from rebasin.cli import app

        rng = random.Random(0)
        for _ in range(args.fuzz):
            with tempfile.TemporaryDirectory() as t:
                d = Path(t)
                setup(d)
                body = (d / "a.safetensors").read_bytes()
                n = struct.unpack("<Q", body[:8])[0]
                header = bytearray(body[8 : 8 + n])
                for _ in range(rng.randint(1, 6)):
                    header[rng.randrange(len(header))] = rng.randrange(256)
                (d / "bad.safetensors").write_bytes(body[:8] + bytes(header) + body[8 + n :])
                before = {p.name for p in d.iterdir()}
                cwd = os.getcwd()
                os.chdir(d)
                try:
                    r = CliRunner().invoke(
                        app, ["merge", "bad.safetensors", "b.safetensors", "-o", "o.safetensors"]
                    )
                finally:
                    os.chdir(cwd)
                code = r.exit_code
                err = r.stderr + (
                    "Traceback" if r.exception and not isinstance(r.exception, SystemExit) else ""
                )
                verdict = (
                    classify(d, before - {"o.safetensors"}, code, err, 2) if code != 0 else "accepted (valid)"
                )
                tally[f"fuzz: {verdict}"] += 1
    print()
    total = sum(tally.values())
    print(f"{total} bad inputs: " + ", ".join(f"{v} {k}" for k, v in sorted(tally.items())))


if __name__ == "__main__":
    main()
