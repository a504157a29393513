"""The package's import graph, TYPE_CHECKING imports counted: no cycle, and no part reaches
for the composition root (only app.py, and tests, import server.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import etcdgw

SRC = Path(etcdgw.__file__).parent


def graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file, TYPE_CHECKING too)."""
    out: dict[str, set[str]] = {}
    for path in sorted(SRC.glob("*.py")):
        name = path.stem
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:  # from . import x
                    deps.update(a.name for a in node.names)
                elif node.module and node.module.startswith("etcdgw."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(
                    a.name.split(".")[1] for a in node.names if a.name.startswith("etcdgw.")
                )
        out[name] = {d for d in deps if (SRC / f"{d}.py").exists() and d != name}
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's smallest rotation, found by depth-first search."""
    found: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(g.get(node, ())):
            if nxt == start:
                found.add(tuple(path))
            elif nxt not in path and nxt > start:
                walk(start, nxt, [*path, nxt])

    for start in sorted(g):
        walk(start, start, [start])
    return [list(c) for c in sorted(found)]


def test_no_import_cycle() -> None:
    g = graph()
    assert "health" in g and "server" in g["app"]  # the scan sees the package
    assert cycles(g) == []


def test_only_app_imports_the_gateway() -> None:
    g = graph()
    assert sorted(m for m, deps in g.items() if "server" in deps) == ["app"]


if __name__ == "__main__":  # python3 tests/test_import_graph.py: the graph and its cycles
    g = graph()
    for m in sorted(g):
        print(f"{m}: {', '.join(sorted(g[m])) or '-'}")
    print("cycles:", cycles(g) or "none")
