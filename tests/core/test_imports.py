"""The package's import structure, read from the source (AST), not from a running interpreter.

* No import cycle among the modules of ``attribution_core`` and the first-party plugins, counting
  imports inside functions too (a cycle dodged by a function-local import is still a cycle)
  but not those under ``if TYPE_CHECKING:`` (never executed). Importing ``a.b.c`` also runs
  ``a.b``'s ``__init__``: that edge counts unless ``a.b`` is the importer's own package.
* A first-party plugin imports the core only through its declared API: ``from attribution_core
  import <names in attribution_core.__all__>``, never a core module directly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import attribution_core

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"


def module_files() -> dict[str, Path]:
    """``module name -> file`` for the core and every first-party plugin package."""
    out = {}
    bases = [(ROOT, ROOT / "attribution_core")] + [
        (PLUGINS, d) for d in sorted(PLUGINS.iterdir()) if (d / "__init__.py").is_file()
    ]
    for base, package in bases:
        for f in package.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def targets(node: ast.Import | ast.ImportFrom, importer: str, modules: set[str]) -> set[str]:
    """The known modules an import statement executes."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative import
            pkg = importer.split(".")[: -node.level] if node.level else []
            base = ".".join([*pkg, base] if base else pkg)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):  # parent packages below the top level, then itself
            candidate = ".".join(parts[:i])
            own_package = importer.startswith(candidate + ".") or importer == candidate
            if candidate in modules and (candidate == name or not own_package):
                out.add(candidate)
        if name in modules and "." not in name:
            out.add(name)  # `from attribution_core import X`: runs the package's __init__
    out.discard(importer)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    modules = set(files)
    return {
        m: set().union(*[targets(n, m, modules) for n in runtime_imports(ast.parse(f.read_text()))])
        for m, f in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules, or None (iterative DFS with colours)."""
    colour: dict[str, int] = {}
    for start in sorted(graph):
        if colour.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not colour.get(child):
                colour[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def test_graph_sees_the_core_and_every_plugin():
    graph = import_graph()
    assert "attribution_core.pipeline" in graph and "attribution_kfac.kfac" in graph
    assert "attribution_core.build" in graph["attribution_core.pipeline"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_first_party_plugins_import_only_the_declared_api():
    api = set(attribution_core.__all__)
    bad = []
    for module, f in module_files().items():
        if module.startswith("attribution_core"):
            continue
        for node in runtime_imports(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                bad += [
                    f"{module}: import {a.name}"
                    for a in node.names
                    if a.name.startswith("attribution_core.")
                ]
            elif node.module == "attribution_core":
                bad += [
                    f"{module}: {a.name} is not in attribution_core.__all__"
                    for a in node.names
                    if a.name not in api
                ]
            elif (node.module or "").startswith("attribution_core."):
                bad.append(f"{module}: from {node.module} import ... (use `from attribution_core`)")
    assert not bad, "plugins reaching past the plugin API:\n" + "\n".join(bad)
