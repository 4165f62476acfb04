"""The layout of ../shared/DESIGN.md, checked on the source: imports point downward only.

Every ``import`` and ``from ... import`` in ``src/metareg`` (also those inside functions) is read
with :mod:`ast`. Modules form no cycle; neither do the units (a subpackage such as ``metareg.nets``,
or a top-level module such as ``metareg.config``); library units never import the application
(``metareg.runs``) or the command line (``metareg.cli``).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
APPLICATION = ("metareg.runs", "metareg.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "metareg").rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The metareg modules ``name`` imports (a ``from pkg import x`` of a submodule counts as x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("metareg")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("metareg"):
                continue
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known}
    return {m for m in found if m in known and m != name}


@functools.cache
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def unit(module: str) -> str:
    """The unit a module belongs to: ``metareg.<subpackage>`` or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_source_tree_is_read():
    edges = graph()
    assert len(edges) > 50 and "metareg.runs.common" in edges and "metareg.nets.slots" in edges["metareg.nets.conv"]


def test_no_module_import_cycle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()) or [])


def test_no_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for module, targets in graph().items():
        edges.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    found = cycle(edges)
    assert found is None, " -> ".join(found or [])


@pytest.mark.parametrize("module", sorted(m for m in modules() if not m.startswith(APPLICATION) and m != "metareg"))
def test_library_never_imports_the_application(module):
    bad = sorted(t for t in graph()[module] if t.startswith(APPLICATION))
    assert not bad, f"{module} imports {bad}"


def test_the_checker_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
