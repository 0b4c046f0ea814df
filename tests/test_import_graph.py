"""kotomamba's modules import each other without circles: every import counts, at module level, inside
functions and under TYPE_CHECKING alike (a circle through a function-level import is still a circle)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kotomamba"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(target for target in targets if target in modules and target != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
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


def test_the_graph_sees_imports_everywhere():
    graph = import_graph()
    assert "kotomamba.state" in graph["kotomamba.checkpoint"]  # under TYPE_CHECKING
    assert "kotomamba.checkpoint" in graph["kotomamba.train"]  # inside functions
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_every_user_facing_error_has_one_base():
    """Each entry point catches one class: every exception class of ours derives from KotomambaError."""
    import importlib
    import inspect
    import sys

    from kotomamba.errors import KotomambaError

    sys.path.insert(0, str(PACKAGE.parent))
    modules = [name for name in import_graph() if not name.endswith("__init__")] + [
        "megatron_lm.data_builder", "megatron_lm.gpt_dataset", "megatron_lm.indexed_dataset", "megatron_lm.helpers",
        "megatron_lm.tokenizer.tokenizer", "megatron_lm.tools.preprocess_data", "inference"]
    from kotomamba.kernels import select_kernel_backend

    select_kernel_backend("cpu")  # before anything imports mamba_ssm
    errors = []
    for name in modules:
        module = importlib.import_module(name)
        errors += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                   if issubclass(cls, Exception) and cls.__module__ == name and not cls.__name__.startswith("_")]
    assert len(errors) >= 20
    assert [cls.__qualname__ for cls in errors if not issubclass(cls, KotomambaError)] == []
