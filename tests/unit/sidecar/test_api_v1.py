"""The generated ``sidecar.api.v1`` stubs: light to import and reproducible from ``proto/``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_import_pulls_in_neither_torch_nor_duckdb() -> None:
    code = (
        "import sys, sidecar.api.v1 as v1\n"
        "assert v1.SERVICE_NAME == 'forensics.v1.IncidentService'\n"
        "print(sorted(m for m in ('torch', 'duckdb', 'transformers', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_regenerating_reproduces_committed_stubs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("_forensics_proto_gen", REPO / "proto" / "gen.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    written = gen.generate(tmp_path)
    names = sorted(p.name for p in written)
    committed = sorted(p.name for p in (REPO / "sidecar" / "api" / "v1").iterdir()
                       if p.name.endswith(gen.GENERATED_SUFFIXES))
    assert names == committed
    assert {"incidents_pb2.py", "incidents_pb2.pyi", "incidents_pb2_grpc.py",
            "incidents_pb2_grpc.pyi"} <= set(names)
    for p in written:
        fresh = p.read_bytes()
        old = (REPO / "sidecar" / "api" / "v1" / p.name).read_bytes()
        assert fresh == old, f"{p.name} differs from a fresh `python proto/gen.py`; regenerate"
        assert b"from forensics.v1" not in fresh and b"import forensics.v1" not in fresh


def test_messages_round_trip() -> None:
    from sidecar.api import v1

    req = v1.UploadIncidentRequest(header=v1.UploadHeader(incident_id="inc-1", total_size=3))
    back = v1.UploadIncidentRequest.FromString(req.SerializeToString())
    assert back.WhichOneof("part") == "header"
    assert back.header.incident_id == "inc-1" and back.header.total_size == 3
    assert v1.JobState.Name(v1.JOB_STATE_DONE) == "JOB_STATE_DONE"
