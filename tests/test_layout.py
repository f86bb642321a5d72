"""The house rules a reader relies on: imports run one way (no circle among the project's
modules, imports for type checking included), so each module reads without its dependents."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("dqo_ray", "actors", "jobs")


def _module(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (functions and TYPE_CHECKING too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_cycles(root: Path, files: list[Path]) -> list[list[str]]:
    modules = {_module(root, p): p for p in files}
    graph = {m: {d for d in _imports(p, set(modules)) if d != m and not m.startswith(d + ".")}
             for m, p in modules.items()}  # a module's own package is not an import of it
    state: dict[str, str] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_imports_run_one_way():
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 50
    assert import_cycles(REPO, files) == []


def test_the_cycle_finder_finds_a_cycle_through_type_checking(tmp_path):
    pkg = tmp_path / "dqo_ray"
    pkg.mkdir()
    (pkg / "a.py").write_text("from dqo_ray.b import thing\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from dqo_ray.a import other\n")
    (pkg / "c.py").write_text("import dqo_ray.a\n")
    assert import_cycles(tmp_path, sorted(pkg.glob("*.py"))) == [["dqo_ray.a", "dqo_ray.b", "dqo_ray.a"]]
