"""No import cycles inside mlra_mega: every `mlra_mega` import, function-local ones included, parsed
from the source (imports under `if TYPE_CHECKING:` never run and are left out)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlra_mega"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mlra_mega":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mlra_mega")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    names = set(paths)
    return {name: {m for m in _imports(ast.parse(p.read_text()), names) if m in names and m != name}
            for name, p in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "mlra_mega.train.trainer" in graph["mlra_mega.train.run"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mlra_mega.x import y\n"
                     "def f():\n    from mlra_mega.z import w\n")
    assert _imports(tree, {"mlra_mega.z"}) == {"mlra_mega.z"}


def function_local_imports(package_dir: Path) -> list[str]:
    """`path:line module` of every `mlra_mega` import made inside a function under `package_dir`."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] == "mlra_mega"]
    return found


def test_the_training_package_imports_at_the_top() -> None:
    """Function-local imports hide cycles: mlra_mega/train imports its own package at the top only."""
    assert function_local_imports(PACKAGE / "train") == []
    # The scan sees them where they are: the CLI imports each command's module lazily, by design.
    assert any(x.startswith("mlra_mega/cli.py:") for x in function_local_imports(PACKAGE))


def test_megatron_parallel_state_is_read_in_one_place() -> None:
    """The parallel context holds the groups: `parallel_state` only in distributed.py and the model."""
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "parallel_state" in p.read_text())
    assert users and all(u == "distributed.py" or u.startswith("model/") for u in users), users
