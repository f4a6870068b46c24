"""The model's import graph: acyclic, every import at module level, and nothing
in ``stress/model/`` reaches the oracle layer (the oracles sit above the model
and attach through its hooks)."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / "stress" / "model"


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> tuple[list[str], list[tuple[int, str]], list[str]]:
    """(runtime module-level imports, function-level imports as (line, name),
    TYPE_CHECKING-only imports)."""
    runtime: list[str] = []
    typing_only: list[str] = []
    nested: list[tuple[int, str]] = []

    def names(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        mod = node.module or ""
        if mod == "stress.model":  # from stress.model import events
            return [f"stress.model.{a.name}" for a in node.names]
        return [mod]

    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            runtime += names(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for sub in node.body:
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    typing_only += names(sub)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    nested += [(sub.lineno, n) for n in names(sub)]
    return runtime, nested, typing_only


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]], dict[str, set[str]]]:
    graph: dict[str, set[str]] = {}
    nested: dict[str, list[tuple[int, str]]] = {}
    typing_edges: dict[str, set[str]] = {}
    for path in sorted(MODEL.glob("*.py")):
        mod = f"stress.model.{path.stem}"
        runtime, inner, typing_only = _imports(ast.parse(path.read_text()))
        graph[mod] = {m for m in runtime + [n for _, n in inner]
                      if m.startswith("stress.model.")}
        typing_edges[mod] = {m for m in typing_only if m.startswith("stress.")}
        if inner:
            nested[mod] = inner
    return graph, nested, typing_edges


def test_no_function_level_imports() -> None:
    _, nested, _ = _graph()
    assert not nested, "function-level imports in stress/model: " + "; ".join(
        f"{m}:{line} imports {n}" for m, v in nested.items() for line, n in v)


def test_model_import_graph_is_acyclic() -> None:
    graph, _, _ = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n in graph and not state.get(n):
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)


def test_kvm_is_at_the_bottom() -> None:
    """kvm.py (struct kvm) imports no model module that does protocol work."""
    graph, _, _ = _graph()
    allowed = {"stress.model.errors", "stress.model.events", "stress.model.rcu",
               "stress.model.hooks", "stress.model.spte"}
    assert graph["stress.model.kvm"] <= allowed, graph["stress.model.kvm"] - allowed


def test_model_does_not_import_the_oracles() -> None:
    offenders = []
    for path in sorted(MODEL.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""])
                offenders += [f"{path.name}:{node.lineno} {m}" for m in mods
                              if m.startswith("stress.oracles") or m == "stress.checks"]
    assert not offenders, offenders


def test_typing_only_imports_are_few() -> None:
    """TYPE_CHECKING imports are annotations only (no runtime edge); keep them to
    the two edges that point up: kvm.py names the Variant it runs, hooks.py (below
    kvm.py) the Kvm its hooks receive."""
    _, _, typing_edges = _graph()
    edges = {(m, n) for m, ns in typing_edges.items() for n in ns}
    assert edges <= {("stress.model.kvm", "stress.model.variants"),
                     ("stress.model.hooks", "stress.model.kvm")}, edges
