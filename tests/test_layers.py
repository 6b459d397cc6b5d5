"""The package's layers (docs: ARCHITECTURE.md), enforced: every import inside imagesmith, function-level ones
included, points to its own layer or one below, and no modules import each other in a circle.

Layers, bottom to top: core, models, engine, vision, compose, eval, train, workflows, serve, cli."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "imagesmith"
LAYERS = ("core", "models", "engine", "vision", "compose", "eval", "train", "workflows", "serve", "cli")


def _module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its body), for the package at `root`."""
    name = root.name
    modules = {_module(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{a.name}" for a in node.names] + [origin]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `from pkg import name`: the module itself, or the package
                    t = t.rpartition(".")[0]
                if t.startswith(name) and t != mod and (t.count(".") or t == name):
                    found.add(t)
        graph[mod] = found
    return graph


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    out = []
    for mod, targets in graph.items():
        src = layer_of(mod)
        for t in targets:
            dst = layer_of(t)
            if src and dst and LAYERS.index(dst) > LAYERS.index(src):
                out.append((mod, t))
    return sorted(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph or w.count(".") == 0:  # the package's own __init__ imports everything: not an edge
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_module_imports_from_a_layer_above_it():
    graph = import_graph(PACKAGE)
    assert len(graph) >= 90  # the whole package was read
    assert upward_imports(graph) == []


def test_no_modules_import_each_other_in_a_circle():
    assert cycles(import_graph(PACKAGE)) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The checks themselves, on a small package that breaks both rules (a function-level import included)."""
    pkg = tmp_path / "imagesmith"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/requests.py": "def f():\n    from ..workflows.detailer import Options\n",
        "workflows/__init__.py": "",
        "workflows/detailer.py": "from ..core import requests\nclass Options: ...\n",
        "models/__init__.py": "",
        "models/a.py": "from .b import x\ny = 1\n",
        "models/b.py": "import imagesmith.models.a\nx = 2\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(textwrap.dedent(text))
    graph = import_graph(pkg)
    assert upward_imports(graph) == [("imagesmith.core.requests", "imagesmith.workflows.detailer")]
    assert cycles(graph) == [["imagesmith.core.requests", "imagesmith.workflows.detailer"],
                             ["imagesmith.models.a", "imagesmith.models.b"]]
