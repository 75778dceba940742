"""The folder layout is the architecture (docs/design.md): imports only point down
simulations -> server/clients -> mmn_fed -> edge_runtime; ``server`` reaches ``clients`` only through its
engines (``server/engines/``, the one place that wires a ServerApp to ClientApps); ``mmn_fed`` imports Flower
only in ``mmn_fed/records.py``; and no two modules of the project import each other, directly or round a loop.

Every import counts: absolute and relative (``from ..x import y``, resolved to the full module name),
function-level and ``TYPE_CHECKING`` ones, and imports by string (``importlib.import_module("...")``,
``__import__("...")``). A dynamic import whose module name is not a literal must be declared in ``DYNAMIC``
with the modules it can reach, or the test fails.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_runtime", "mmn_fed", "clients", "server", "simulations")

# package -> top-level names none of its modules may import
FORBIDDEN = {
    "edge_runtime": {"torch", "pandas", "flwr", "mmn_fed", "clients", "server", "simulations"},
    "mmn_fed": {"flwr", "clients", "server", "simulations"},
    "clients": {"server", "simulations"},
    "server": {"clients", "simulations"},
}
# module (or package, with everything below it) -> forbidden names it may import after all
ALLOWED = {
    "mmn_fed.records": {"flwr"},  # the one module of mmn_fed that converts Flower records
    "server.engines": {"clients"},  # the engines wire the ServerApp to ClientApps
}
# file -> the modules its non-literal dynamic imports can reach
DYNAMIC = {
    "edge_runtime/__init__.py": {"edge_runtime.bundle", "edge_runtime.trust"},  # lazy bundle API (_LAZY)
    # lazy public names (_LAZY): `import mmn_fed.cli` must work on the edge-only install (no torch, pandas)
    "mmn_fed/__init__.py": {"mmn_fed.api", "mmn_fed.data", "mmn_fed.model", "mmn_fed.model_io", "mmn_fed.training"},
}


@dataclass(frozen=True)
class Import:
    module: str  # full dotted name
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(current: str, is_package: bool, level: int, module: str | None) -> str:
    """``from <level dots><module> import ...`` inside module ``current`` -> the absolute base module."""
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level - 1 > len(base) - 1:
        raise ValueError(f"relative import beyond the top-level package in {current}")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _dynamic_name(call: ast.Call) -> tuple[str | None, bool]:
    """(module name, is_dynamic_import) of ``importlib.import_module(...)`` / ``import_module(...)`` /
    ``__import__(...)``; the name is None when it is not a string literal."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__"):
        return None, False
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value, True
    return None, True


def scan(source: str, current: str, is_package: bool, known: set[str]) -> tuple[list[Import], list[int]]:
    """Every module ``source`` imports (full names; a ``from a import b`` where ``a.b`` is a module of the
    project counts as ``a.b``), and the lines of dynamic imports whose module name is not a literal."""
    out: list[Import] = []
    opaque: list[int] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [Import(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(current, is_package, node.level, node.module) if node.level
                    else node.module or "")
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            if len(subs) < len(node.names):  # some names are attributes of ``base`` itself
                out.append(Import(base, node.lineno))
            out += [Import(s, node.lineno) for s in subs]
        elif isinstance(node, ast.Call):
            name, dynamic = _dynamic_name(node)
            if not dynamic:
                continue
            if name is None:
                opaque.append(node.lineno)
                continue
            package = next((k.value.value for k in node.keywords if k.arg == "package"
                            and isinstance(k.value, ast.Constant)), None)
            if name.startswith(".") and package is None:
                opaque.append(node.lineno)  # relative to a package given by a variable (e.g. __name__)
                continue
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                name = _resolve_relative(package, True, level, name.lstrip(".") or None)
            out.append(Import(name, node.lineno))
    return out, opaque


def project_files() -> dict[str, Path]:
    return {module_name(f): f for p in PACKAGES for f in sorted((ROOT / p).rglob("*.py"))}


def import_graph(files: dict[str, Path]) -> tuple[dict[str, list[Import]], list[str]]:
    """module -> its imports; plus the non-literal dynamic imports not declared in DYNAMIC."""
    known = set(files)
    graph, undeclared = {}, []
    for mod, path in files.items():
        imports, opaque = scan(path.read_text(), mod, _is_package(path), known)
        rel = path.relative_to(ROOT).as_posix()
        if opaque and rel in DYNAMIC:
            imports += [Import(m, opaque[0]) for m in sorted(DYNAMIC[rel])]
        elif opaque:
            undeclared += [f"{rel}:{line}: import by a non-literal name (declare it in DYNAMIC)" for line in opaque]
        graph[mod] = imports
    return graph, undeclared


def _allowed(mod: str, top: str) -> bool:
    return any((mod == k or mod.startswith(k + ".")) and top in v for k, v in ALLOWED.items())


def layout_violations(graph: dict[str, list[Import]], files: dict[str, Path]) -> list[str]:
    bad = []
    for mod, imports in graph.items():
        forbidden = FORBIDDEN.get(mod.split(".")[0], set())
        for imp in imports:
            top = imp.module.split(".")[0]
            if top in forbidden and not _allowed(mod, top):
                bad.append(f"{files[mod].relative_to(ROOT)}:{imp.line}: {mod} imports {imp.module}")
    return bad


def find_cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected group of project modules (Tarjan)."""
    edges = {m: sorted({i.module for i in imps if i.module in graph and i.module != m}) for m, imps in graph.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:  # a concrete loop through the group: walk edges inside it until a module repeats
        start = min(group)
        path, seen = [start], {start}
        while True:
            nxt = next(w for w in edges[path[-1]] if w in group)
            if nxt in seen:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


@pytest.fixture(scope="module")
def project():
    files = project_files()
    graph, undeclared = import_graph(files)
    return files, graph, undeclared


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down_the_layout(project, package):
    files, graph, _ = project
    bad = [v for v in layout_violations(graph, files) if v.startswith(package + "/")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles(project):
    _, graph, _ = project
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_dynamic_import_is_visible(project):
    _, _, undeclared = project
    assert not undeclared, "\n".join(undeclared)


def test_the_scanner_sees_relative_function_level_and_string_imports():
    """The rules above are only as good as the scanner: it must see what the old test skipped."""
    known = {"server", "server.engines", "server.engines.ray", "server.app", "clients", "clients.app", "mmn_fed",
             "mmn_fed.protocol"}
    src = (
        "from . import ray\n"                      # sibling module of a module
        "from ..app import app\n"                  # attribute of a parent's module
        "from .. import app as A\n"                # parent's module
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('clients.app')\n"
        "    __import__('mmn_fed.protocol')\n"
        "    importlib.import_module('.app', package='clients')\n"
        "    importlib.import_module(name)\n"      # opaque
    )
    imports, opaque = scan(src, "server.engines.inprocess", False, known)
    assert sorted(i.module for i in imports) == ["clients.app", "clients.app", "importlib", "mmn_fed.protocol",
                                                "server.app", "server.app", "server.engines.ray"]
    assert opaque == [9]
    # in a package's __init__, one dot is the package itself
    imports, _ = scan("from .ray import run_ray\nfrom . import ray\n", "server.engines", True, known)
    assert [i.module for i in imports] == ["server.engines.ray", "server.engines.ray"]


def test_rules_and_cycle_finder_catch_what_they_should():
    """The rules and the cycle finder on a small graph with one of each defect (and one of each exception)."""
    g = {
        "server.app": [Import("clients.app", 3), Import("server.strategy", 4)],  # server -> clients: forbidden
        "server.strategy": [Import("server.app", 5)],  # cycle with server.app
        "server.engines.inprocess": [Import("clients.app", 6)],  # allowed: the engines
        "mmn_fed.model": [Import("flwr.app", 7)],  # forbidden
        "mmn_fed.records": [Import("flwr.app", 8)],  # allowed
        "clients.app": [],
    }
    files = {m: ROOT / (m.replace(".", "/") + ".py") for m in g}
    bad = layout_violations(g, files)
    assert bad == ["server/app.py:3: server.app imports clients.app", "mmn_fed/model.py:7: mmn_fed.model imports flwr.app"]
    assert find_cycles(g) == [["server.app", "server.strategy", "server.app"]]
