"""The project's import graph: the compression boundary holds, the leaves import nothing of the
package, and no module imports itself back through others.

Every `import` and `from ... import` of every module counts, at module level or inside a function.
An import of `a.b.c` is an edge to the module `a.b.c` and to the packages `a.b` and `a` above it,
since Python runs their `__init__` first (the importing module's own packages are already running and
count only where named); `from a.b import c` is an edge to `a.b.c` where `c` is a submodule, and to `a.b` otherwise.
"""
from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("tokcomp_jax", "pallas_kernels")


class Edge(NamedTuple):
    """`source` imports `target`, at `line` of its file."""
    source: str
    target: str
    line: int


class Rule(NamedTuple):
    """Modules within `scope` import nothing within `forbidden`."""
    scope: str
    forbidden: tuple[str, ...]
    why: str


RULES = (
    Rule("tokcomp_jax.models", ("tokcomp_jax.presses", "tokcomp_jax.generation"),
         "a model hands its observations to whatever compressor it was given"),
    Rule("tokcomp_jax.presses", ("tokcomp_jax.models", "tokcomp_jax.generation"),
         "a press sees only what a model hands it"),
    Rule("pallas_kernels", ("tokcomp_jax",), "kernels stand alone"),
    Rule("tokcomp_jax.cache", PACKAGES, "the cache is a leaf"),
    Rule("tokcomp_jax.training", ("tokcomp_jax.testing",), "test helpers are for tests"),
)

Graph = Mapping[str, Sequence[Edge]]


def within(module: str, prefix: str) -> bool:
    """`module` is `prefix` or one of its submodules."""
    return module == prefix or module.startswith(prefix + ".")


def boundary_violations(graph: Graph, rules: Iterable[Rule]) -> list[str]:
    """A message for every edge that a rule forbids."""
    return [f"{edge.source} (line {edge.line}) imports {edge.target}: {rule.scope} must not import "
            f"{' or '.join(rule.forbidden)} ({rule.why})"
            for rule in rules for edges in graph.values() for edge in edges
            if within(edge.source, rule.scope) and any(within(edge.target, f) for f in rule.forbidden)]


def strongly_connected(graph: Graph) -> list[list[str]]:
    """The graph's strongly connected components (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for edge in graph.get(node, ()):
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def shortest_cycle(graph: Graph, start: str, members: set[str]) -> list[str]:
    """The shortest chain of imports from `start` back to itself through `members` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph.get(node, ()):
                if edge.target == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(parents[chain[-1]])
                    return [start, *reversed(chain[:-1]), start]
                if edge.target in members and edge.target not in parents:
                    parents[edge.target] = node
                    following.append(edge.target)
        frontier = following
    raise ValueError(f"{start} is on no cycle within {sorted(members)}.")


def import_cycles(graph: Graph) -> list[str]:
    """A message per group of modules that import each other: its shortest cycle through its first
    module, and the group's other modules where there are more."""
    messages = []
    for component in strongly_connected(graph):
        start = component[0]
        if len(component) == 1 and all(edge.target != start for edge in graph.get(start, ())):
            continue
        cycle = shortest_cycle(graph, start, set(component))
        others = sorted(set(component) - set(cycle))
        messages.append("import cycle: " + " -> ".join(cycle) + (f" (with {', '.join(others)})" if others else ""))
    return messages


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
                     modules: set[str]) -> list[str]:
    """The project modules an import statement in `module` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    own_packages = {module.rsplit(".", depth)[0] for depth in range(1, module.count(".") + 1)} | (
        {module} if is_package else set())
    found = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        enclosing = [name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)]
        for target in [name] + [package for package in enclosing if package not in own_packages]:
            if target and target not in found:
                found.append(target)
    return found


def project_graph() -> dict[str, list[Edge]]:
    """Every project module and the project modules it imports."""
    paths = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}
    graph = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[module] = [Edge(module, target, node.lineno) for node in ast.walk(tree)
                         if isinstance(node, (ast.Import, ast.ImportFrom))
                         for target in imported_modules(node, module, path.name == "__init__.py", set(paths))]
    return graph


@pytest.fixture(scope="module")
def graph():
    return project_graph()


def test_the_graph_holds_every_module_and_its_function_level_imports(graph):
    assert {"tokcomp_jax", "tokcomp_jax.cache", "pallas_kernels.common", "tokcomp_jax.evaluation.tasks"} <= set(graph)
    checkpoints = {edge.target for edge in graph["tokcomp_jax.checkpoints"]}
    assert "tokcomp_jax.checkpoints.hf" in checkpoints  # `from tokcomp_jax.checkpoints import hf`


@pytest.mark.parametrize("rule", RULES, ids=[rule.scope for rule in RULES])
def test_boundary(graph, rule):
    violations = boundary_violations(graph, [rule])
    assert not violations, "\n".join(violations)


def test_an_import_reaches_the_packages_above_the_module(graph):
    """Importing `tokcomp_jax.training.lora` runs `tokcomp_jax/training/__init__.py` first: a cycle
    through a package's `__init__` fails at import time although no module names it."""
    icae = {edge.target for edge in graph["tokcomp_jax.learned.icae"]}
    assert {"tokcomp_jax.training.lora", "tokcomp_jax.training"} <= icae
    assert "tokcomp_jax.learned" not in icae  # its own package is already running


def test_no_import_cycles(graph):
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(cycles)


SYNTHETIC = {
    "pkg": [Edge("pkg", "pkg.a", 1)],
    "pkg.a": [Edge("pkg.a", "pkg.b", 3), Edge("pkg.a", "pkg.leaf", 4)],
    "pkg.b": [Edge("pkg.b", "pkg", 7)],  # back through the package's __init__
    "pkg.leaf": [Edge("pkg.leaf", "other", 2)],
    "other": [Edge("other", "other", 5)],
    "clean": [Edge("clean", "pkg.leaf", 1)],
}


def test_checker_reports_a_cycle_as_a_chain():
    assert import_cycles(SYNTHETIC) == ["import cycle: other -> other", "import cycle: pkg -> pkg.a -> pkg.b -> pkg"]


def test_checker_reports_a_forbidden_edge_with_its_line():
    rules = [Rule("pkg.leaf", ("other",), "leaves stay leaves"), Rule("clean", ("pkg.a",), "unused")]
    assert boundary_violations(SYNTHETIC, rules) == [
        "pkg.leaf (line 2) imports other: pkg.leaf must not import other (leaves stay leaves)"]


def test_checker_passes_a_graph_without_cycles():
    assert import_cycles({"a": [Edge("a", "b", 1)], "b": [Edge("b", "c", 1)], "c": []}) == []


def test_imports_resolve_submodules_packages_and_relative_names():
    modules = {"pkg", "pkg.sub", "pkg.sub.mod", "pkg.other"}
    statement = lambda text: ast.parse(text).body[0]
    assert imported_modules(statement("from pkg.sub import mod, name"), "pkg.other", False, modules) == [
        "pkg.sub.mod", "pkg.sub"]
    assert imported_modules(statement("import pkg.sub.mod.thing, numpy"), "pkg", True, modules) == [
        "pkg.sub.mod", "pkg.sub"]
    assert imported_modules(statement("from pkg.sub.mod import name"), "outside", False, modules | {"outside"}) == [
        "pkg.sub.mod", "pkg.sub", "pkg"]
    assert imported_modules(statement("from . import mod"), "pkg.sub", True, modules) == ["pkg.sub.mod"]
    assert imported_modules(statement("from ..other import name"), "pkg.sub.mod", False, modules) == ["pkg.other"]
    assert imported_modules(statement("from .. import name"), "pkg.sub.mod", False, modules) == ["pkg"]
