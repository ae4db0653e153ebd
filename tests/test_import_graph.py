"""The packages' import graph: no module cycle anywhere (imports inside functions count), and the
kernel library never imports the harness.

The graph is read from the source with `ast`, so an import hidden in a function body, which Python
only runs on the first call, is an edge like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dkbench", "kernels")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports. ``from pkg import sub`` is an edge to the submodule
    ``pkg.sub``, not to ``pkg`` (Python runs ``pkg/__init__`` first, but that package is the
    importer's parent and already loading)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names
                          if f"{target}.{alias.name}" in modules]
            edges.update(submodules)
            if len(submodules) < len(node.names):
                edges.add(target)
    return {edge for edge in edges if edge in modules and edge != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    found.append(sorted(component))
    return found


def test_the_graph_is_read_from_both_packages():
    graph = _graph()
    # A reader that found no edges would pass the cycle test on anything.
    assert "dkbench.measure.runner" in graph and "kernels.attention" in graph
    assert "dkbench.spec.sweep" in graph["dkbench.measure.runner"]
    assert "kernels.select" in graph["kernels.attention"]


def test_cycles_are_found_including_imports_inside_functions(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    module = tmp_path / "m.py"
    module.write_text("def late():\n    from pkg import other\n")
    assert _imported("pkg.m", module, {"pkg.m": module, "pkg.other": module}) == {"pkg.other"}


def test_no_module_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", [m for m in _modules() if m.startswith("kernels")])
def test_kernels_never_import_the_harness(module):
    modules = _modules()
    imported = _imported(module, modules[module], modules)
    assert not [m for m in imported if m.split(".")[0] == "dkbench"], imported
    source = modules[module].read_text(encoding="utf-8")
    assert "dkbench" not in {n.split(".")[0] for n in _all_import_names(source)}


def _all_import_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


@pytest.mark.parametrize("module", [m for m in _modules() if m.startswith("dkbench")])
def test_the_harness_uses_only_the_kernels_public_api(module):
    import kernels

    tree = ast.parse(_modules()[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not [a.name for a in node.names if a.name.startswith("kernels.")], node.lineno
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            assert not node.module.startswith("kernels."), (
                f"line {node.lineno}: from {node.module} import ...; import it from kernels")
            if node.module == "kernels":
                private = [a.name for a in node.names if a.name not in kernels.__all__]
                assert not private, f"line {node.lineno}: not in kernels.__all__: {private}"
