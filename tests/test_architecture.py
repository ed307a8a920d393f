"""The one-way house (docs/architecture.md): no module of kiln imports, at any level, a module that
imports it back, and the builder never reaches the engine or the runtime.

Imports are read from the source with ``ast`` (inside functions and ``TYPE_CHECKING`` blocks too),
so a cycle hidden in a function-level import fails here as well as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "kiln").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The kiln modules ``name`` imports: ``from a import b`` counts as ``a.b`` where that is a module,
    else as ``a`` (whose ``__init__`` defines ``b``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                edges.add(full if full in modules else base)
    return {m for m in edges if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_no_module_imports_a_module_that_imports_it_back():
    graph = _graph()
    cycles = sorted({tuple(sorted({m, n})) for m in graph for n in _reaches(graph, m) if m in _reaches(graph, n)})
    assert not cycles, f"import cycles (counting imports inside functions): {cycles}"


@pytest.mark.parametrize("lower, upper", [
    ("kiln.builder", "kiln.engine"), ("kiln.builder", "kiln.runtime"), ("kiln.passes", "kiln.builder"),
    ("kiln.ops", "kiln.passes"), ("kiln.runtime", "kiln.engine"), ("kiln.timing", "kiln.bench"),
])
def test_data_flows_one_way(lower, upper):
    """An earlier stage never imports a later one (DESIGN's flow: passes → builder → engine → runtime)."""
    graph = _graph()
    for name in graph:
        if name == lower or name.startswith(lower + "."):
            bad = {m for m in _reaches(graph, name) if m == upper or m.startswith(upper + ".")}
            assert not bad, f"{name} reaches {sorted(bad)}"


def test_the_check_sees_function_level_imports(tmp_path):
    """The reader counts an import inside a function (the kind that hid the engine/builder cycle)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from kiln.engine import Engine\n")
    assert _imports("kiln.x", path, {"kiln.engine": path, "kiln.x": path}) == {"kiln.engine"}
