"""alignkit's packages import each other in layers: no cycle, and the bottom layers import nothing above.

The graph is read from the source with `ast`, between top-level units (`alignkit.sample`,
`alignkit.train`, `alignkit.runner`, ...). Every import counts wherever it sits, inside a function or
under `TYPE_CHECKING` too: a lazy import only hides a cycle until the function runs, and a type-only
import still ties one package's API to another's.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import alignkit

ROOT = Path(alignkit.__file__).parent

# Below every stage: they may import only each other (and the standard library / third parties).
BOTTOM = {"errors", "config", "records", "objects", "worlds", "models", "data", "stage", "tracking"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether a dotted alignkit name is a module or package in the source tree."""
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def imported_modules(tree: ast.AST, module: str, is_package: bool = False) -> Iterator[tuple[str, int]]:
    """(alignkit module, line) for every import in `tree`, at any depth; relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                # `from alignkit import sample` depends on alignkit.sample, `from alignkit.x import f` on alignkit.x
                sub = f"{base}.{alias.name}"
                yield (sub if sub.startswith("alignkit.") and is_module(sub) else base), node.lineno


def unit(module: str) -> str:
    """The top-level unit a module belongs to: alignkit.sample.base -> sample, alignkit.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "alignkit"


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: ["alignkit/file.py:line", ...]}, without a unit's imports of itself."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        src = unit(module)
        graph.setdefault(src, {})
        for name, line in imported_modules(tree, module, path.name == "__init__.py"):
            if name.split(".")[0] == "alignkit" and (dst := unit(name)) != src:
                where = graph[src].setdefault(dst, [])
                if (at := f"{path.relative_to(ROOT.parent)}:{line}") not in where:
                    where.append(at)
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle as a path [a, b, ..., a], or None when the graph has none (depth-first, in sorted order)."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def describe(cycle: list[str], graph: Mapping[str, Mapping[str, list[str]]]) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        lines.append(f"  {a} -> {b}: {', '.join(graph[a][b])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the checker itself


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({}) is None
    assert find_cycle({"runner": {"train", "sample"}, "train": {"sample", "models"}, "sample": {"models"}}) is None
    assert find_cycle({"sample": {"train"}, "train": {"models", "sample"}}) == ["sample", "train", "sample"]
    # a longer cycle, reached from a node outside it, through a unit that sits on top
    graph = {"cli": {"runner"}, "runner": {"train"}, "train": {"reward"}, "reward": {"runner"}}
    assert find_cycle(graph) == ["runner", "train", "reward", "runner"]


def test_imports_are_seen_at_any_depth_and_relative_ones_resolved():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import alignkit.records\n"
        "if TYPE_CHECKING:\n"
        "    from alignkit.judge import Rubric\n"
        "def f():\n"
        "    from alignkit.train.ppo import train_ppo\n"
        "    from alignkit import pairs, __version__\n"
        "    from . import templates\n"
        "    from .base import Request\n"
    )
    found = {name for name, _ in imported_modules(ast.parse(source), "alignkit.sample.vllm_backend")}
    assert {"alignkit.records", "alignkit.judge", "alignkit.train.ppo", "alignkit.pairs", "alignkit",
            "alignkit.sample.templates", "alignkit.sample.base"} <= found  # fmt: skip
    assert {unit(n) for n in found if n.startswith("alignkit")} == {
        "records", "judge", "train", "pairs", "alignkit", "sample"}  # fmt: skip


def test_graph_reports_where_an_edge_comes_from():
    graph = import_graph()
    assert {"sample", "train", "models", "data", "cli", "runner", "records"} <= set(graph)
    assert any(where.startswith("alignkit/cli.py:") for where in graph["cli"]["runner"])


# ---------------------------------------------------------------------------------------------
# alignkit's own graph


def test_no_import_cycle_between_packages():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between alignkit's packages:\n" + describe(cycle, graph)


def test_bottom_layers_import_only_bottom_layers():
    graph = import_graph()
    upward = [
        f"{src} -> {dst}: {', '.join(where)}"
        for src in sorted(BOTTOM & set(graph))
        for dst, where in sorted(graph[src].items())
        if dst not in BOTTOM
    ]
    assert not upward, f"the bottom layers {sorted(BOTTOM)} import from above:\n" + "\n".join(upward)


def test_library_code_does_not_import_test_fixtures():
    graph = import_graph()
    users = [f"{src}: {', '.join(edges['testing'])}" for src, edges in sorted(graph.items()) if "testing" in edges]
    assert not users, "alignkit.testing holds test fixtures only, yet is imported by:\n" + "\n".join(users)
