"""The package has no import circle: the graph of its modules' imports of each other, module-level and
function-local alike (a local import that closes a circle is a circle put off, not removed), has no cycle; nor
has the graph of its subpackages (``bmr``, ``guides``, ``models``, ``nets``, ``posteriors``) and top-level
modules, so no subpackage reaches up into one that builds on it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pyrozoo"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, not ``__init__``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # ``from pyrozoo.nets import lenet`` imports the module pyrozoo.nets.lenet, not a name in pyrozoo.nets
            targets.update(
                f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names
            )
    return {t for t in targets if t in known and t != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circle():
    found = modules()
    graph = {name: imported(name, path, set(found)) for name, path in found.items()}
    circles = cycles(graph)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_subpackage_reaches_up_into_one_that_imports_it():
    found = modules()
    top = {name: ".".join(name.split(".")[:2]) for name in found}  # pyrozoo.bmr.units -> pyrozoo.bmr
    graph = {room: set() for room in top.values()}
    for name, path in found.items():
        graph[top[name]].update(top[t] for t in imported(name, path, set(found)) if top[t] != top[name])
    circles = cycles(graph)
    assert not circles, "circles between subpackages: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
