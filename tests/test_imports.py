"""The package's modules import each other without a circle (issue #14).

Every ``from . import x``, ``from .x import y``, ``import gemma3.x`` and ``from gemma3[.x] import
y`` statement of every gemma3/*.py counts, function-level ones included; only imports under
``if TYPE_CHECKING:`` are left out (they never run). An edge to the package itself (``__init__``)
counts too (``from gemma3 import load`` inside the package); ``from gemma3 import _check`` names
a module and counts as an edge to that module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "gemma3"


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """Names of gemma3 modules imported anywhere in tree (TYPE_CHECKING blocks excepted)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.level == 0 and node.module and (
                    node.module == "gemma3" or node.module.startswith("gemma3."))):
                base = node.module or ""
                if node.level == 0:
                    base = base[len("gemma3"):].lstrip(".")
                if base:
                    found.add(base.split(".")[0])
                else:  # from . import a, b: modules, or names the package itself defines
                    for a in node.names:
                        found.add(a.name if a.name in modules | {"_core"} else "__init__")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "gemma3":
                    found.add("__init__")
                elif a.name.startswith("gemma3."):
                    found.add(a.name.split(".")[1])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in PKG.glob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        deps = _imports(ast.parse(path.read_text(encoding="utf-8"), str(path)), modules)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := dfs(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := dfs(n)):
            return c
    return None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert {"model", "engine", "generation", "eval", "scoring"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_sees_function_level_imports_and_circles():
    src = "def f():\n    from .b import x\n"
    assert _imports(ast.parse(src), {"a", "b"}) == {"b"}
    tc = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import x\n"
    assert _imports(ast.parse(tc), {"a", "b"}) == set()
    assert _imports(ast.parse("from . import b, c\nimport gemma3.a"), {"a", "b"}) == {"a", "b"}
    pkg = {"a", "b", "__init__"}
    assert _imports(ast.parse("from gemma3 import b, load"), pkg) == {"b", "__init__"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_scoring_and_eval_do_not_reach_into_model_privates():
    """eval works through the engine (gemma3.engine) and the public Model API only."""
    for name in ("eval", "scoring", "inspect", "generation"):
        src = (PKG / f"{name}.py").read_text(encoding="utf-8")
        for private in ("model._core", "model._check_ids", "model._exclusive", "model._ids",
                        "model._feed", "model._sync"):
            assert private not in src, f"gemma3/{name}.py uses {private}"
