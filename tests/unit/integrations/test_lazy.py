"""lazy_exports: a package's public names are imported on first use, then cached."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from integrations._lazy import lazy_exports

ROOT = Path(__file__).resolve().parents[3]


def test_resolves_on_first_use_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = types.ModuleType("lazy_demo")
    monkeypatch.setitem(sys.modules, "lazy_demo", pkg)
    pkg.__getattr__, pkg.__dir__ = lazy_exports(  # type: ignore[attr-defined]
        "lazy_demo", {"dumps": "json", "sqrt": "math"})
    import json

    assert "dumps" not in vars(pkg)
    assert pkg.dumps is json.dumps
    assert vars(pkg)["dumps"] is json.dumps  # cached: later reads are plain attributes
    assert {"dumps", "sqrt"} <= set(dir(pkg))
    with pytest.raises(AttributeError, match="'lazy_demo' has no attribute 'nope'"):
        pkg.nope  # noqa: B018


def test_integrations_packages_import_their_heavy_parts_on_first_use() -> None:
    code = (
        "import sys, integrations, integrations.exporters, integrations.sites, "
        "integrations.incident\n"
        "from integrations.incident import TensorRecord, fsync_dir\n"
        "heavy = ('torch', 'numpy', 'pyarrow', 'grpc')\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "assert 'Incident' in dir(integrations) and 'attach' in dir(integrations.sites)\n"
        "integrations.exporters.SidecarExporter\n"
        "assert 'grpc' in sys.modules\n"
        "integrations.Incident\n"
        "assert 'pyarrow' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
