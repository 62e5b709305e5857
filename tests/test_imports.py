"""The package's modules import each other in one direction: no loop, lazy or not.

Walks every ``nnxfit`` module's imports with ``ast`` (module level, inside functions and
under ``TYPE_CHECKING`` alike: an import hidden in a function to dodge a loop is still the
loop) and fails naming the modules of a cycle. The parent packages that Python initialises on
the way to a module are not counted: only what a module names.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nnxfit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The nnxfit modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up ``level - 1`` steps
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            if not base.startswith("nnxfit"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # ``from nnxfit import interrupt`` imports the submodule; a name from
                # ``nnxfit.x`` imports ``nnxfit.x``.
                out.add(sub if sub in known else base)
    out.discard(name)
    return {m for m in out if m in known}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_finds_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "nnxfit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from nnxfit.sub import high\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "high.py").write_text("from .. import low\n")
    known = {"nnxfit", "nnxfit.low", "nnxfit.sub", "nnxfit.sub.high"}
    global PACKAGE
    old, PACKAGE = PACKAGE, pkg
    try:
        assert _imports("nnxfit.low", pkg / "low.py", known) == {"nnxfit.sub.high"}
        assert _imports("nnxfit.sub.high", pkg / "sub" / "high.py", known) == {"nnxfit.low"}
    finally:
        PACKAGE = old


def test_no_import_loop():
    graph = import_graph()
    assert "nnxfit.trainer" in graph and "nnxfit.callbacks.base" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_the_trainer_sits_above_what_it_runs():
    """Nothing the Trainer is built from imports it back."""
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if "nnxfit.trainer" in deps)
    # ``lr_finder`` runs a fit of its own: it sits above the Trainer, as the package does.
    assert users == ["nnxfit", "nnxfit.lr_finder"], users
    below, todo = set(), ["nnxfit.trainer"]
    while todo:
        for dep in graph[todo.pop()] - below:
            below.add(dep)
            todo.append(dep)
    assert not below & set(users), sorted(below & set(users))
