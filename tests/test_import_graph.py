"""bdscan's modules import each other without cycles.

The graph is built from the source with :mod:`ast`, so nothing is imported: an edge ``a -> b`` is an ``import``
or ``from ... import`` statement in ``a`` that names module ``b`` of bdscan, at module level or inside a
function (an import moved into a function to dodge a cycle is still a cycle). Relative imports are resolved
against the importing module's package, and ``from pkg import name`` points at the submodule ``pkg.name`` when
there is one, else at ``pkg``. Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``; those
implicit edges are left out (with them, every package whose ``__init__`` imports its own submodules would be a
cycle).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import bdscan

ROOT = Path(bdscan.__file__).resolve().parent


@dataclass(frozen=True)
class Edge:
    """One import statement: ``source`` imports ``target`` at ``line``."""

    source: str
    target: str
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    """``bdscan/io/base.py`` -> ``bdscan.io.base``; ``bdscan/io/__init__.py`` -> ``bdscan.io``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(name: str, path: Path, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = _package_of(name, path).split(".")
    if node.level - 1 >= len(base):
        return None  # beyond the top-level package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(target: str, known: dict[str, Path]) -> str | None:
    """``target`` or its longest prefix that is a module of the package (``import a.b`` where b is a name)."""
    parts = target.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def import_edges(known: dict[str, Path]) -> list[Edge]:
    """The import statements between the modules in ``known`` (see the module docstring)."""
    top = next(iter(known)).split(".")[0]
    edges: list[Edge] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = _resolve(name, path, node)
                if mod is None:
                    continue
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
            for t in targets:
                if t.split(".")[0] != top:
                    continue
                resolved = _known(t, known)
                if resolved is not None and resolved != name:
                    edges.append(Edge(name, resolved, node.lineno))
    return edges


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One shortest cycle through each strongly connected component of more than one module."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    out: list[list[Edge]] = []
    for comp in _components(graph):
        if len(comp) < 2:
            continue
        start = min(comp)
        out.append(_shortest_cycle(graph, comp, start))
    return out


def _components(graph: dict[str, dict[str, Edge]]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, todo = work[-1]
            if todo:
                w = todo.pop()
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, sorted(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp: set[str] = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                comps.append(comp)
    return comps


def _shortest_cycle(graph: dict[str, dict[str, Edge]], comp: set[str], start: str) -> list[Edge]:
    """Breadth-first from ``start`` back to ``start`` inside ``comp``."""
    prev: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt: list[str] = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in comp:
                    continue
                if w == start:
                    path = [graph[v][w]]
                    while path[0].source != start:
                        path.insert(0, prev[path[0].source])
                    return path
                if w not in prev:
                    prev[w] = graph[v][w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component of 2+ has one


def describe(cycle: list[Edge]) -> str:
    """``a -> b -> a`` plus where each import statement is."""
    chain = " -> ".join([cycle[0].source] + [e.target for e in cycle])
    where = "; ".join(f"{e.source} line {e.line} imports {e.target}" for e in cycle)
    return f"{chain} ({where})"


# ---------------------------------------------------------------------------------------------------- the checks


def test_the_graph_builder_sees_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a as a\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..c import X\n")
    (pkg / "c.py").write_text("import pkg.sub.b\nfrom pkg import a\n")
    known = modules(pkg)
    got = {(e.source, e.target) for e in import_edges(known)}
    assert got == {("pkg", "pkg.a"), ("pkg.a", "pkg.sub.b"), ("pkg.sub.b", "pkg.c"), ("pkg.c", "pkg.sub.b"), ("pkg.c", "pkg.a")}
    found = cycles(import_edges(known))
    assert [describe(c).split(" (")[0] for c in found] == ["pkg.a -> pkg.sub.b -> pkg.c -> pkg.a"]


@pytest.mark.parametrize("scope", ["bdscan.io", "bdscan.repair", "bdscan"])
def test_no_import_cycles(scope: str) -> None:
    known = modules()
    found = [c for c in cycles(import_edges(known)) if any(e.source == scope or e.source.startswith(scope + ".") for e in c)]
    assert not found, "import cycles:\n" + "\n".join(describe(c) for c in found)
