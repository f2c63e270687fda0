"""The package layout keeps its promises: no import cycles between dd's modules (lazy imports inside functions
included), and no module outside a family's own package names a family in code (only the registry lists them)."""
from __future__ import annotations

import ast
from pathlib import Path

from dd.families.registry import FAMILIES

DD = Path(__file__).resolve().parents[1] / "dd"


def module_name(path: Path) -> str:
    parts = path.relative_to(DD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in DD.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The dd modules a file imports anywhere in it (``from dd.x import y`` counts dd.x.y when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
            if len(subs) < len(node.names):   # names that are not submodules come from the package itself
                out.add(node.module)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}
    assert sum(map(len, graph.values())) > 50          # the graph was read (a broken parser finds nothing)
    assert cycles(graph) == []


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _code_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants of the code, docstrings left out."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_module_outside_a_family_names_a_family():
    names = set(FAMILIES)
    assert {"var", "llamagen"} <= names
    offenders = []
    for name, path in modules().items():
        if name == "dd.families.registry" or any(name.startswith(f"dd.families.{f}") for f in names):
            continue
        tree = ast.parse(path.read_text())
        offenders += [f"{name}:{line}: {value!r}" for line, value in _code_strings(tree) if value in names]
        offenders += [f"{name}:{n.lineno}: imports {n.module}" for n in ast.walk(tree)
                      if isinstance(n, ast.ImportFrom) and n.module
                      and any(n.module.startswith(f"dd.families.{f}") for f in names)]
    assert offenders == []
