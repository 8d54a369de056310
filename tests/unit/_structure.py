"""The source tree as the structure tests see it (DESIGN §16), read from source, never imported.

Modules of a package, the import graph between them (every import: module level, inside
functions and under ``if TYPE_CHECKING:`` — or only what runs, with ``runtime_only``), one
cycle of a graph, and the modules and functions over the size bars.

Example::

    known = modules("sidecar")                 # name -> path, generated stubs left out
    graph = import_graph(known)
    assert find_cycle(graph) is None
    assert not oversized(known)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Generated code (protobuf + gRPC stubs): outside the size bars.
GENERATED = ("sidecar/api/v1",)
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules(*packages: str, skip: Sequence[str] = GENERATED) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``packages`` (not under ``skip``)."""
    out = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if any(rel.as_posix().startswith(f"{s}/") for s in skip):
                continue
            parts = rel.with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(name: str, path: Path, *, runtime_only: bool = False) -> Iterator[str]:
    """Every dotted name module ``name`` imports, relative imports made absolute
    (``from m import x`` gives ``m.x``); ``runtime_only`` leaves out ``if TYPE_CHECKING:``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    stack: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield from (f"{base}.{a.name}" for a in node.names)
            continue
        for child in ast.iter_child_nodes(node):
            if runtime_only and isinstance(child, ast.If) and \
                    "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)  # the body only ever runs under a type checker
            else:
                stack.append(child)


def import_graph(known: Mapping[str, Path], *, runtime_only: bool = False
                 ) -> dict[str, set[str]]:
    """Module -> the ``known`` modules it imports (a name is cut back to its nearest known
    module: ``from . import x`` counts ``.x``, ``from m import f`` counts ``m``)."""
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        found = set()
        for target in imported_names(name, path, runtime_only=runtime_only):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        graph[name] = found
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done
    for start in graph:
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def oversized(known: Mapping[str, Path]) -> dict[str, str]:
    """Qualified name (``pkg.mod`` or ``pkg.mod.Class.method``) -> what is over the bars:
    modules over :data:`MAX_MODULE_LINES` lines, functions over :data:`MAX_FUNCTION_LINES`."""
    found: dict[str, str] = {}
    for name, path in known.items():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found[name] = f"{rel}: {len(text.splitlines())} lines"
        for qualname, node in _functions(ast.parse(text), name):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                found[qualname] = f"{rel}:{node.lineno} {node.name}() is {n} lines"
    return found


def _functions(node: ast.AST, prefix: str
               ) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            qualname = f"{prefix}.{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield qualname, child
            yield from _functions(child, qualname)
        else:
            yield from _functions(child, prefix)
