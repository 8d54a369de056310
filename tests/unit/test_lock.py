"""The lock (requirements/lock.txt) pins every dependency the README's commands and CI install.

`make install` passes the lock as a pip constraints file; these tests fail when a dependency is
added to pyproject.toml without re-running `make lock`, and when the installed grpcio-tools is
not the pinned one (the committed stubs in sidecar/api/v1 are its output, byte for byte).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "lock.txt"
LOCK_IN = REPO / "requirements" / "lock.in"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m is not None, req
    return _norm(m.group(1))


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def test_every_declared_dependency_is_pinned() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = list(project["dependencies"])
    for reqs in project["optional-dependencies"].values():
        declared += [r for r in reqs if not r.startswith("model-forensics")]
    for line in LOCK_IN.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            declared.append(line)
    pins = _pins()
    missing = sorted({_requirement_name(r) for r in declared} - set(pins))
    assert not missing, f"not in requirements/lock.txt: {missing}; run `make lock`"


def test_lock_has_no_index_urls_and_only_exact_pins() -> None:
    text = LOCK.read_text(encoding="utf-8")
    assert "--extra-index-url" not in text and "--find-links" not in text
    reqs = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert reqs and all("==" in ln for ln in reqs), [ln for ln in reqs if "==" not in ln]


def test_lock_in_pins_the_stub_generator() -> None:
    lines = LOCK_IN.read_text(encoding="utf-8").splitlines()
    assert "grpcio-tools==" + _pins()["grpcio-tools"] in lines
    assert "torch==2.13.0" in lines


def test_installed_grpcio_tools_is_the_pinned_one() -> None:
    try:
        installed = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("grpcio-tools is not installed (it is in the dev extra)")
    assert installed == _pins()["grpcio-tools"], (
        f"grpcio-tools {installed} is installed but the lock pins {_pins()['grpcio-tools']}; "
        "install with `make install` (it uses the lock)")


def test_committed_stubs_come_from_the_pinned_generator() -> None:
    stub = (REPO / "sidecar" / "api" / "v1" / "incidents_pb2_grpc.py").read_text(encoding="utf-8")
    m = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", stub)
    assert m is not None
    assert m.group(1) == _pins()["grpcio-tools"], "regenerate: python proto/gen.py"
