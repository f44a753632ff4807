"""The package's modules import each other without cycles, and the product never imports the lab.

A cycle means two stages each need the other: the mask registry asking the recipe planner, a
trainer importing its own subclass. Every import statement counts, also those inside functions
(they only postpone the cycle to run time). The lab (``dam_mergekit.lab``: zoos, evaluation,
bench, claims) builds on the product; the product works without it, so no module outside the lab
imports it, except ``dam_mergekit.cli``, which lists the lab's subcommands.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dam_mergekit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                targets = [
                    f"{node.module}.{a.name}"
                    if f"{node.module}.{a.name}" in modules
                    else node.module
                    for a in node.names
                ]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert "dam_mergekit.model_files" in graph["dam_mergekit.masks.registry"]  # edges are read
    assert cycles(graph) == []


LAB = "dam_mergekit.lab"
# the one product module that may name the lab: the CLI lists every subcommand module
MAY_IMPORT_THE_LAB = {"dam_mergekit.cli"}


def _in_lab(module: str) -> bool:
    return module == LAB or module.startswith(LAB + ".")


def test_the_product_does_not_import_the_lab():
    graph = import_graph()
    assert "dam_mergekit.lab.kinds" in graph["dam_mergekit.lab.zoo.build"]  # lab edges are read
    offenders = {
        module: sorted(t for t in targets if _in_lab(t))
        for module, targets in graph.items()
        if not _in_lab(module) and module not in MAY_IMPORT_THE_LAB
    }
    assert {m: t for m, t in offenders.items() if t} == {}
