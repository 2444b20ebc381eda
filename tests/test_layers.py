"""The package's layers: no import cycle between packages or modules (imports inside functions
counted), imports inside functions only where ``--help`` must stay free of torch (or for optional
packages), and every command's ``--help`` imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "rebasin"
LAZY_PLACES = ("cli/__init__.py", "matching/methods.py", "matching/assignment.py", "__init__.py")
"""Modules that import torch-heavy modules inside functions, so that --help imports no torch."""
OPTIONAL = ("lap", "transformers", "ray", "matplotlib", "mnist1d", "sklearn")
"""Packages imported where they are used: extras, or heavy and needed by one data set or plot."""
COMMANDS = ("merge", "barrier", "permute", "merge-many", "spec", "inspect", "train", "demo", "batch")


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _edges() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    inner: list[tuple[str, str]] = []
    for m, f in mods.items():
        tree = ast.parse(f.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        in_fn = {
            id(n)
            for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
            for n in ast.walk(fn)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.module:
                names += [f"{node.module}.{a.name}" for a in node.names]
            for t in names:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    edges[m].add(t)
            if id(node) in in_fn:
                inner.append((str(f.relative_to(ROOT)), names[0]))
    return edges, inner


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return [*stack[stack.index(w) :], w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycle_between_modules_or_packages() -> None:
    edges, _ = _edges()
    assert _cycle(edges) is None

    def pkg(m: str) -> str:
        return ".".join(m.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for a, bs in edges.items():
        packages.setdefault(pkg(a), set()).update(pkg(b) for b in bs if pkg(b) != pkg(a))
    assert _cycle(packages) is None


def test_imports_inside_functions_only_keep_help_free_of_torch() -> None:
    _, inner = _edges()
    stray = [(f, m) for f, m in inner if f not in LAZY_PLACES and m.split(".")[0] not in OPTIONAL]
    assert stray == []


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_no_torch(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    code = (
        "import sys\nfrom rebasin.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
