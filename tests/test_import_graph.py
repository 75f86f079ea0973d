"""The package's module-level import graph has no cycle (docs/design.md §11).

An edge ``a -> b`` is a module-level ``import`` / ``from ... import`` in ``a`` of a ``blockdiff`` module ``b`` (for
``from pkg import name``, the submodule ``pkg.name`` when it is one, else ``pkg``). Imports inside functions are
lazy and do not count; neither does the implicit import of a module's parent packages (every submodule would
otherwise be in a cycle with a package ``__init__`` that re-exports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blockdiff"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).is_dir() or (ROOT / rel).with_suffix(".py").is_file()


def _module_level(tree: ast.Module):
    """The statements run when the module is imported (``if`` / ``try`` bodies included, function bodies not)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            todo += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]


def import_graph() -> dict[str, set[str]]:
    """``module -> the blockdiff modules it imports at module level``."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in _module_level(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == "blockdiff"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                if base.split(".")[0] != "blockdiff":
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if _is_module(sub) else base)
        edges.discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert "blockdiff.sampling.samplers.registry" in graph  # the graph covers the subpackages
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["blockdiff.sampling.samplers.registry"] = {*graph["blockdiff.sampling.samplers.registry"],
                                                     "blockdiff.sampling.samplers.threshold"}
    assert find_cycle(graph) is not None
