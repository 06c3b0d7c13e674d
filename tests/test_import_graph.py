"""The import graph between momentkv's top-level parts has no cycle: every arrow runs one way.

Each module under the package (``momentkv/``, and ``patches/`` installed as ``momentkv.patches``) is parsed, not
imported; every import it makes, at module level or inside a function, is an arrow from its part to the part
it names. A part is a top-level subpackage or module: ``momentkv.cli``, ``momentkv.engine``, ``momentkv.pooling``...;
``momentkv`` itself is the facade (``momentkv/__init__.py``). The graph of parts must be acyclic.
"""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "momentkv"

# Arrows allowed to close a cycle for now, each with the reason it is still there. An entry whose import is
# gone fails ``test_known_exceptions_are_still_needed``: delete it then.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


def _package_dirs() -> dict[str, Path]:
    """Package name -> folder, as pyproject.toml installs them (``momentkv.patches`` lives in ``patches/``)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    dirs = {PACKAGE: ROOT / PACKAGE}
    dirs.update({name: ROOT / folder for name, folder in setuptools.get("package-dir", {}).items()
                 if name.startswith(PACKAGE + ".") and (ROOT / folder / "__init__.py").is_file()})
    return dirs


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every module of the package."""
    modules = {}
    for name, folder in _package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            dotted = ".".join((name, *(parts[:-1] if is_package else parts)))
            modules.setdefault(dotted, (path, is_package))
    return modules


def _imported(tree: ast.Module, module: str, is_package: bool, known: set[str]):
    """Every momentkv module that ``module`` names in an import statement."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # ``from momentkv import eval`` names a module; ``import patch``, the facade
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return ".".join(parts[:2])


def import_graph() -> dict[tuple[str, str], set[str]]:
    """``(part, part it imports) -> {modules making that import}``, over every module of the package."""
    modules = _modules()
    known = set(modules)
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for target in _imported(tree, module, is_package, known):
            source, dest = _part(module), _part(target)
            if dest is not None and source != dest:
                edges[(source, dest)].add(module)
    return edges


def cycles(edges) -> list[set[str]]:
    """The strongly connected components with more than one part (Tarjan's algorithm)."""
    graph = defaultdict(set)
    for source, dest in edges:
        graph[source].add(dest)
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(set(graph) | {d for targets in graph.values() for d in targets}):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_package():
    edges = import_graph()
    parts = {part for edge in edges for part in edge}
    assert {"momentkv.cli", "momentkv.engine", "momentkv.policy", "momentkv.patches"} <= parts
    assert ("momentkv.engine", "momentkv.policy") in edges  # a module-level import
    assert ("momentkv.cli", "momentkv.integrations") in edges  # an import inside a function


def test_parts_import_each_other_without_cycles():
    edges = {edge: modules for edge, modules in import_graph().items() if edge not in KNOWN_CYCLE_EDGES}
    found = cycles(edges)
    report = [
        f"{source} -> {dest} (in {', '.join(sorted(edges[(source, dest)]))})"
        for component in found for (source, dest) in sorted(edges) if source in component and dest in component
    ]
    assert not found, "import cycles between momentkv's parts:\n  " + "\n  ".join(report)


def test_known_exceptions_are_still_needed():
    edges = import_graph()
    stale = [f"{source} -> {dest}" for source, dest in KNOWN_CYCLE_EDGES if (source, dest) not in edges]
    assert not stale, f"remove from KNOWN_CYCLE_EDGES, the import is gone: {', '.join(stale)}"


def test_cycles_are_found_and_named():
    edges = {("a", "b"): {"a.x"}, ("b", "c"): {"b.y"}, ("c", "a"): {"c.z"}, ("c", "d"): {"c.w"}}
    assert cycles(edges) == [{"a", "b", "c"}]
    assert cycles({("a", "b"): set(), ("b", "c"): set()}) == []
