"""Regenerates the committed protobuf / gRPC stubs in ``sidecar/api/v1`` from ``proto/``.

Runs grpcio-tools' bundled protoc with ``--python_out``, ``--pyi_out``, ``--grpc_python_out``
and mypy-protobuf's ``--mypy_grpc_out``, then rewrites the generated ``forensics.v1`` imports to
``sidecar.api.v1`` (the package the stubs live in). Deterministic: the same inputs and tool
versions give byte-identical files (a test checks the committed files against a fresh run).

Example::

    python proto/gen.py                 # regenerate into sidecar/api/v1
    python proto/gen.py --out /tmp/x    # generate elsewhere (used by the reproducibility test)
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "sidecar" / "api" / "v1"
PROTO_PACKAGE = "forensics/v1"
PY_PACKAGE = "sidecar.api.v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _fix_imports(text: str) -> str:
    """Rewrite ``forensics.v1`` module references to ``sidecar.api.v1``."""
    text = re.sub(r"\bfrom forensics\.v1 import\b", f"from {PY_PACKAGE} import", text)
    text = re.sub(r"\bimport forensics\.v1\.", f"import {PY_PACKAGE}.", text)
    return re.sub(r"(?<![\w.])forensics\.v1\.(\w+_pb2)\b", rf"{PY_PACKAGE}.\1", text)


def generate(out_dir: Path) -> list[Path]:
    """Generate the stubs for every ``proto/forensics/v1/*.proto`` into ``out_dir``.

    Returns the written files, sorted. Raises ``RuntimeError`` when protoc fails.
    """
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT / PROTO_PACKAGE}")
    plugin = shutil.which("protoc-gen-mypy_grpc")
    if plugin is None:
        raise RuntimeError("protoc-gen-mypy_grpc not on PATH; pip install mypy-protobuf")
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-mypy_grpc={plugin}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
        gen_dir = Path(tmp) / PROTO_PACKAGE
        for src in sorted(gen_dir.iterdir()):
            if not src.name.endswith(GENERATED_SUFFIXES):
                continue
            dst = out_dir / src.name
            dst.write_text(_fix_imports(src.read_text(encoding="utf-8")), encoding="utf-8")
            written.append(dst)
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python proto/gen.py [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
