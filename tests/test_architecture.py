"""The layering written in docs/architecture.md holds: no module imports a package the page
does not allow it, and no two modules import each other, directly or through others (imports
inside functions count)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
SOURCES = ("fam_core", "exporters", "handlers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "fam_core":
        parts.insert(0, "fam_core")  # exporters/ and handlers/ install as fam_core.<folder>
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            if "_generated" not in path.parts:
                found[module_name(path)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that ``path`` imports anywhere (not under ``TYPE_CHECKING``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module, *(f"{child.module}.{a.name}" for a in child.names)]
            for name in names:
                if name in known:
                    found.add(name)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def package_of(module: str) -> str:
    """The layer a module belongs to: ``fam_core.<first part>`` (a root module is its own)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fam_core"


def allowed_imports() -> dict[str, set[str]]:
    """The page's table: ``| `package` | `other`, `other` |`` rows."""
    table: dict[str, set[str]] = {}
    for line in PAGE.read_text().splitlines():
        match = re.match(r"\|\s*`([\w.]+)/?`\s*\|(.*)\|\s*$", line)
        if match:
            table[match.group(1)] = set(re.findall(r"`([\w.]+)/?`", match.group(2)))
    return table


def test_every_package_is_on_the_page() -> None:
    table = allowed_imports()
    packages = {package_of(name) for name in modules()} - {"fam_core"}
    assert packages <= set(table), f"add to docs/architecture.md: {sorted(packages - set(table))}"


def test_packages_import_only_what_the_page_allows() -> None:
    known = modules()
    table = allowed_imports()
    wrong = []
    for name, path in sorted(known.items()):
        here = package_of(name)
        if here == "fam_core":
            continue  # fam_core/__init__.py re-exports the public API
        for target in imports(path, known):
            there = package_of(target)
            if there != here and there not in table.get(here, set()):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    known = modules()
    graph = {name: imports(path, known) for name, path in known.items()}
    cycles = _strongly_connected(graph)
    assert not cycles, "\n".join(" -> ".join(sorted(c)) for c in cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def test_a_cycle_is_found() -> None:
    """The checker itself: a two-module loop and a three-module loop are reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(map(sorted, _strongly_connected(graph))) == [["a", "b"], ["c", "d", "e"]]
