"""Imports go one way: the static import graph of the installed package (resnas_kernels and its subpackages models,
search and bench, read with `ast`, imports inside functions included) has no cycle, and the search's library never
imports its command-line front ends.

An import inside a function still makes the two modules depend on each other (it only postpones the failure to the
first call), so it counts like a top-level one. `import a.b.c` and `from a.b import c` (c a module) are edges to
a.b.c; `from a.b import name` (name not a module) is an edge to a.b. The parent packages an import runs on the way
are not edges: every submodule would otherwise depend on its package's __init__, which imports it back."""
import ast
import functools
import importlib.util
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = "resnas_kernels"
# Installed as subpackages from top-level folders of the repository (setup.py's package_dir), so found by their spec.
MAPPED_SUBPACKAGES = ("models", "search", "bench")

def _package_dirs() -> Dict[str, Path]:
    dirs = {}
    for name in (PACKAGE, *(f"{PACKAGE}.{sub}" for sub in MAPPED_SUBPACKAGES)):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, f"{name} is not an installed package"
        dirs[name] = Path(list(spec.submodule_search_locations)[0])
    return dirs


def _modules() -> Dict[str, Tuple[Path, bool]]:
    """module name -> (source file, is a package)."""
    found: Dict[str, Tuple[Path, bool]] = {}

    def walk(name: str, folder: Path) -> None:
        found[name] = (folder / "__init__.py", True)
        for path in sorted(folder.iterdir()):
            if path.is_dir() and (path / "__init__.py").is_file():
                walk(f"{name}.{path.name}", path)
            elif path.suffix == ".py" and path.name != "__init__.py":
                found[f"{name}.{path.stem}"] = (path, False)

    for name, folder in _package_dirs().items():
        walk(name, folder)
    return found


def _target(name: str, modules) -> str:
    """The innermost module of ours that `name` (a module or a name in one) lies in; '' for other packages."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> Dict[str, Set[str]]:
    """module -> the modules of ours it imports (a fresh copy: callers may edit it)."""
    return {name: set(edges) for name, edges in _parsed_graph().items()}


@functools.lru_cache(maxsize=1)
def _parsed_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for name, (path, is_package) in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            edges.update(t for t in (_target(t, modules) for t in targets) if t and t != name)
        graph[name] = edges
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected component (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[Set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for component in components:   # a shortest way back to the first module, inside the component
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        out.append(paths[last] + [start])
    return out


def test_cycle_finder_finds_a_cycle_and_ignores_a_tree():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert len(graph) > 50 and all(name.startswith(PACKAGE) for name in graph)
    # aot_resources.py imports _atomic inside a function only; backend.py's `from . import _ext` is relative
    assert "resnas_kernels._atomic" in graph["resnas_kernels.aot_resources"]
    assert "resnas_kernels._ext" in graph["resnas_kernels.backend"]
    assert "resnas_kernels.search.trainer" in graph["resnas_kernels.search.commands.train_supernet"]


def test_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_search_library_never_imports_the_command_line():
    graph = import_graph()
    commands = f"{PACKAGE}.search.commands"
    offenders = sorted(f"{source} -> {target}" for source, targets in graph.items() for target in targets
                       if (target == commands or target.startswith(commands + "."))
                       and not (source == commands or source.startswith(commands + ".")))
    assert not offenders, offenders
