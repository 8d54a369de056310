"""Every module of ``integrations`` says what it exports: ``__all__`` complete and sorted.

Complete: every public name a module binds at top level (functions, classes, constants, type
aliases; for a package ``__init__`` also what it imports or exports lazily) is listed; listed
names resolve. Sorted: isort-style, as ruff's RUF022 (CONSTANTS, then Classes, then the rest).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "integrations"
# Its owner (the config unification of issue 12) completes it; not edited here.
SKIP = {"config.py"}
MODULES = sorted(p for p in PACKAGE.rglob("*.py")
                 if p.relative_to(PACKAGE).as_posix() not in SKIP)


def _sort_key(name: str) -> tuple[int, str]:
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def _bound_names(path: Path) -> tuple[list[str] | None, set[str]]:
    """(__all__, public names bound at top level) of a module, from its source."""
    tree = ast.parse(path.read_text())
    exported: list[str] | None = None
    names: set[str] = set()
    is_init = path.name == "__init__.py"

    def visit(stmts: list[ast.stmt]) -> None:
        nonlocal exported
        for s in stmts:
            if isinstance(s, ast.If) and "TYPE_CHECKING" in ast.unparse(s.test):
                visit(s.body)  # lazily exported names are imported here for type checkers
            elif isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(s.name)
            elif isinstance(s, (ast.Assign, ast.AnnAssign)):
                targets = s.targets if isinstance(s, ast.Assign) else [s.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id == "__all__":
                        exported = list(ast.literal_eval(s.value))
                    else:
                        names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(s, ast.ImportFrom) and is_init:
                module = s.module or ""
                if module not in ("__future__", "typing") and not module.endswith("_lazy"):
                    names.update(a.asname or a.name for a in s.names)

    visit(tree.body)
    return exported, {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_all_is_complete_sorted_and_resolves(path: Path) -> None:
    exported, public = _bound_names(path)
    assert exported is not None, f"{path.name} has no __all__"
    assert exported == sorted(exported, key=_sort_key), "__all__ is not sorted (isort-style)"
    assert len(set(exported)) == len(exported), "__all__ lists a name twice"
    assert not public - set(exported), f"public but not in __all__: {sorted(public - set(exported))}"
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    module = importlib.import_module(".".join(rel.parts).removesuffix(".__init__"))
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"in __all__ but not defined: {missing}"
