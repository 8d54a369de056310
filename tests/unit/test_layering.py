"""DESIGN §1 import rules, enforced at runtime: what stays light. (Who may import whom is read
from the source in ``tests/unit/test_structure.py``.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
