"""No import circles between the project's modules, function-local imports included.

Every module of ``deepseekmoe_jax`` (its ``convert`` and ``cli`` packages included), the checkout's ``convert``
wrapper and ``train.py`` is parsed; each ``import`` and ``from ... import`` anywhere in it (top level or inside a
function) that names a project module becomes an edge of a module graph:

- ``import a.b.c`` -> ``a.b.c``; ``from a.b import c`` -> ``a.b``, and ``a.b.c`` too when that is a module. So
  ``from deepseekmoe_jax import distributed`` imports the package ``__init__`` as well as ``distributed``.
- importing ``a.b.c`` first runs the ``__init__`` of its packages ``a`` and ``a.b``: those that do not also
  contain the importing module (whose own packages are already being imported) are edges too.

Imports of other libraries (jax, torch, ...) are not project modules and do not matter. Imports under
``if TYPE_CHECKING:`` never run and are left out. Any cycle fails the test, printed with the file and line of each
import on it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

Edge = tuple[str, int]  # (imported module, line of the import in the importing file)


def project_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for the package (with deepseekmoe_jax.convert and deepseekmoe_jax.cli), the
    top-level ``convert`` wrapper and the training script."""
    modules = {}
    for package in ("deepseekmoe_jax", "convert"):
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    modules["train"] = root / "train.py"
    return modules


def _is_package(name: str, modules: dict[str, pathlib.Path]) -> bool:
    return modules[name].name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        children = list(ast.iter_child_nodes(node))
        if _type_checking_only(node):
            children = node.orelse
        stack.extend(children)


def imports_of(name: str, modules: dict[str, pathlib.Path]) -> set[Edge]:
    """The project modules that module ``name`` imports, each with the line of its import."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"), filename=str(modules[name]))
    own_packages = {name, *_ancestors(name)} if _is_package(name, modules) else set(_ancestors(name))
    edges: set[Edge] = set()

    def add(target: str, line: int, *, named: bool) -> None:
        if target not in modules:
            return
        if named or target not in own_packages:
            edges.add((target, line))
        for package in _ancestors(target):
            if package in modules and package not in own_packages:
                edges.add((package, line))

    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, named=True)
            continue
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            package = name if _is_package(name, modules) else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        add(base, node.lineno, named=True)
        for alias in node.names:
            add(f"{base}.{alias.name}", node.lineno, named=True)
    return {(t, line) for t, line in edges if t != name}


def import_graph(modules: dict[str, pathlib.Path] | None = None) -> dict[str, set[Edge]]:
    modules = project_modules() if modules is None else modules
    return {name: imports_of(name, modules) for name in modules}


def find_cycles(graph: dict[str, set[Edge]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) through each strongly connected component of
    more than one module (Tarjan's algorithm, iterative)."""
    succ = {n: sorted({t for t, _ in edges if t in graph}) for n, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(succ[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # breadth-first: the shortest way from start back to itself inside the component
        parents: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parents:
            nxt = []
            for node in frontier:
                for child in succ[node]:
                    if child in members and child not in parents:
                        parents[child] = node
                        nxt.append(child)
            frontier = nxt
        path = [start]
        node = parents[start]
        while node != start:
            path.append(node)
            node = parents[node]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def describe(cycle: list[str], graph: dict[str, set[Edge]], modules: dict[str, pathlib.Path]) -> str:
    lines = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        where = sorted(line for t, line in graph[a] if t == b)
        lines.append(f"  {a} -> {b}   ({modules[a].relative_to(ROOT)}:{','.join(map(str, where))})")
    return "\n".join(lines)


def check_no_cycles(graph: dict[str, set[Edge]], modules: dict[str, pathlib.Path]) -> None:
    cycles = find_cycles(graph)
    if cycles:
        text = "\n\n".join(describe(c, graph, modules) for c in cycles)
        pytest.fail(f"{len(cycles)} import cycle(s):\n{text}", pytrace=False)


def test_the_module_list_covers_the_entry_points_and_the_converter():
    modules = project_modules()
    for name in (
        "train",
        "convert",
        "convert.__main__",
        "deepseekmoe_jax.cli.convert",
        "deepseekmoe_jax.cli.train",
        "deepseekmoe_jax.convert",
        "deepseekmoe_jax.convert.common",
        "deepseekmoe_jax.convert.describe",
        "deepseekmoe_jax.convert.hf_to_jax",
        "deepseekmoe_jax.convert.jax_to_hf",
        "deepseekmoe_jax.convert.verify",
        "deepseekmoe_jax.tokenizer",
    ):
        assert name in modules, name


def test_no_import_cycles():
    modules = project_modules()
    check_no_cycles(import_graph(modules), modules)


def test_the_model_modules_do_not_import_placement():
    """The rules table and `constrain` are a leaf: the model's modules and partitioning never reach `sharding`."""
    modules = project_modules()
    graph = import_graph(modules)
    for name in ("deepseekmoe_jax.partitioning", "deepseekmoe_jax.layers", "deepseekmoe_jax.moe"):
        seen, todo = set(), [name]
        while todo:
            node = todo.pop()
            for target, _ in graph[node]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        assert "deepseekmoe_jax.sharding" not in seen and "deepseekmoe_jax.model" not in seen, (name, sorted(seen))
    assert {t for t, _ in graph["deepseekmoe_jax.partitioning"]} == set()


def _graph_of(tmp_path: pathlib.Path, files: dict[str, str]) -> tuple[dict, dict]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    modules = {}
    for path in sorted(tmp_path.rglob("*.py")):
        parts = path.relative_to(tmp_path).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {n: imports_of(n, modules) for n in modules}, modules


def test_the_checker_sees_local_and_package_imports(tmp_path):
    """A function-local import and a ``from pkg import module`` (through the package ``__init__``) close cycles."""
    graph, _ = _graph_of(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import f\n",
            "pkg/a.py": "def f():\n    from pkg import b\n",
            "pkg/b.py": "import os\n",
            "pkg/c.py": "import pkg.d as d\n",
            "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n",
            "pkg/sub/__init__.py": "from pkg.sub.x import y\n",
            "pkg/sub/x.py": "y = 1\n",
            "pkg/e.py": "from pkg.sub.x import y\n",
        },
    )
    assert find_cycles(graph) == [["pkg", "pkg.a", "pkg"]]
    assert {t for t, _ in graph["pkg.c"]} == {"pkg.d"}  # `import pkg.d`: its package is already being imported
    assert graph["pkg.d"] == set()  # TYPE_CHECKING imports never run
    assert {t for t, _ in graph["pkg.e"]} == {"pkg.sub", "pkg.sub.x"}  # the package __init__ runs first
    assert {t for t, _ in graph["pkg.sub.x"]} == set()
