"""DESIGN §1 import rules, enforced: who may import whom, and what stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level project packages it must never import
FORBIDDEN = {
    "integrations": {"analysis", "model_forensics"},  # sidecar only via sidecar.api
    "analysis": {"sidecar", "model_forensics"},
    "sidecar": {"model_forensics"},
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    bad = []
    for path in (ROOT / package).rglob("*.py"):
        if "api/v1" in path.as_posix():
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if package == "integrations" and top == "sidecar" and not name.startswith(
                    "sidecar.api"):
                bad.append(f"{path.relative_to(ROOT)} imports {name} (only sidecar.api allowed)")
            if package == "integrations" and top == "duckdb":
                bad.append(f"{path.relative_to(ROOT)} imports duckdb")
    assert not bad, "\n".join(bad)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


def test_light_imports() -> None:
    mods = _modules_after("import sidecar.api.v1")
    assert "torch" not in mods and "duckdb" not in mods
    mods = _modules_after("import integrations; from integrations import Recorder, triggers, "
                          "exporters, flag")
    for heavy in ("duckdb", "scipy", "transformers", "sklearn", "zstandard"):
        assert heavy not in mods, f"import integrations pulled in {heavy}"


def test_no_python_package_named_proto() -> None:
    assert not (ROOT / "proto" / "__init__.py").exists()
