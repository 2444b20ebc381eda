"""Every example runs, and every command shown in README and docs/ parses against the real CLI."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from rebasin.cli import app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def doc_commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            m = re.match(r"^\$ (.*)$", line.strip())
            if m:
                for part in m.group(1).split("&&"):
                    part = part.strip()
                    if part.startswith("rebasin"):
                        out.append((doc.name, part))
    return out


def test_docs_show_commands() -> None:
    names = {
        shlex.split(c, comments=True)[1] for _, c in doc_commands() if len(shlex.split(c, comments=True)) > 1
    }
    assert {"merge", "barrier", "permute", "spec", "inspect", "train", "demo", "batch"} <= names


@pytest.mark.parametrize(("doc", "command"), doc_commands())
def test_documented_command_parses(doc: str, command: str) -> None:
    group = typer.main.get_command(app)
    argv = shlex.split(command, comments=True)[1:]
    assert argv, command
    ctx = group.make_context("rebasin", list(argv), resilient_parsing=False)
    sub = group.get_command(ctx, argv[0])  # type: ignore[attr-defined]
    assert sub is not None, f"{doc}: unknown command in '{command}'"
    sub.make_context(argv[0], argv[1:], parent=ctx)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    args = [sys.executable, str(example)]
    args += [str(tmp_path)] if example.name == "merge_api.py" else ["--quick", "--out", str(tmp_path)]
    r = subprocess.run(
        args, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "CI": "1"}, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()


def test_ci_runs_the_readme_test_command() -> None:
    """CI runs exactly the README's test command (with the pinned versions), in a new venv."""
    readme = (ROOT / "README.md").read_text()
    commands = [c for c in re.findall(r"^\$ (.*)$", readme, re.M) if "pytest" in c]
    assert len(commands) == 1, commands
    assert "-c constraints.txt" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[0] in ci.splitlines()
    assert "-m venv" in ci
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins
    for name in ("pytest", "transformers", "ray", "sentence-transformers", "hypothesis"):
        assert any(line.lower().startswith(f"{name}==") for line in pins), name
