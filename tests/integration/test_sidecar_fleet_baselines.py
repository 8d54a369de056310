"""CF fleet-wide (DESIGN §12, issue 16): sidecar PROCESSES on one real PostgreSQL catalog, each
with its OWN ``data_dir``, sharing one incident store (``store.uri: file://...``, a directory
standing in for object storage; the S3 path of the same code is tested against the emulator in
``test_sidecar_s3.py``). A baseline built through sidecar A is used by a ``cf`` job submitted
through sidecar B (A stopped: B runs it) for an incident uploaded to B — same version and
digest; another tenant on B gets no baseline; the object altered behind the catalog's back
fails the next reader's job with ``ArtefactError``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from sidecar._client import SidecarClient
from sidecar.api import v1
from tests.integration.conftest import SidecarProcess, build_incident
from tests.integration.test_sidecar_fleet_catalog import TOKENS, _address, _wait_done

pytestmark = pytest.mark.slow

FP = "f" * 64
ACME, GLOBEX = "acme-token-123", "globex-token-456"


@pytest.fixture
def sidecar(tmp_path: Path, pg_dsn: str,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], SidecarProcess]]:
    """``start(name)``: a sidecar process with data dir ``<tmp>/<name>`` on the shared catalog
    and the shared store ``<tmp>/store``; all are stopped at teardown."""
    monkeypatch.setenv("FORENSICS_CATALOG_DSN", pg_dsn)
    procs: list[SidecarProcess] = []

    def start(name: str) -> SidecarProcess:
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "data_dir": str(tmp_path / name), "grpc": {"address": "127.0.0.1:0"},
            "store": {"uri": f"file://{tmp_path / 'store'}"},
            "metrics": {"enabled": False}, "auth": {"tokens": TOKENS},
            "jobs": {"poll_interval_s": 0.1}, "modules": {"cf": {"enabled": False}},
            "baselines": {"detector": "norm"},
            "catalog": {"kind": "postgres", "dsn_env": "FORENSICS_CATALOG_DSN",
                        "connect_timeout_s": 2}}))
        proc = SidecarProcess(config, tmp_path / f"{name}.log").start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.__exit__()


def _done(client: SidecarClient, incident_id: str, kind: str, **params: object) -> v1.Analysis:
    job = client.run_analysis(incident_id, kind, params_json=json.dumps(params) if params else "",
                              request_id=f"{kind}-{time.monotonic_ns()}")
    return _wait_done(client, job.analysis_id)


def test_a_cf_job_on_sidecar_b_uses_the_baseline_sidecar_a_built_tenant_scoped(
        sidecar: Callable[[str], SidecarProcess], tmp_path: Path) -> None:
    a = sidecar("a")
    with SidecarClient(_address(a), token=ACME) as ca:
        for i in range(3):
            assert ca.upload(f"b-{i}", build_incident(f"b-{i}", rule="ratio", seed=i + 1)).created
        built = _done(ca, "b-0", "baseline", fingerprint=FP)
    assert built.state == v1.JOB_STATE_DONE, built.error
    base = json.loads(built.result_json)
    assert base["scope"] == "tenant:acme" and base["version"] == 1
    assert (tmp_path / "store" / base["path"]).is_file()        # in the store, not A's disk
    assert not (tmp_path / "a" / "baselines").exists()
    a.__exit__()                                                # B alone claims what follows

    b = sidecar("b")
    with SidecarClient(_address(b), token=ACME) as cb:
        assert cb.upload("inc-x", build_incident("inc-x", seed=7)).created
        scored = _done(cb, "inc-x", "cf")
    assert scored.state == v1.JOB_STATE_DONE, scored.error
    cf = json.loads(scored.result_json)
    assert cf["status"] == "scored" and cf["anomaly_score"] is not None
    assert cf["baseline"]["version"] == base["version"]
    assert (cf["baseline"]["path"], cf["baseline"]["sha256"]) == (base["path"], base["sha256"])
    assert not (tmp_path / "b" / "baselines").exists()

    with SidecarClient(_address(b), token=GLOBEX) as cg:         # same model, other tenant
        assert cg.upload("g-x", build_incident("g-x", tenant="globex", seed=7)).created
        other = _done(cg, "g-x", "cf")
    assert other.state == v1.JOB_STATE_DONE, other.error
    assert json.loads(other.result_json)["status"] == "no_baseline"
    b.__exit__()

    obj = tmp_path / "store" / base["path"]                      # altered behind the catalog
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    c = sidecar("c")                                             # a reader with nothing cached
    with SidecarClient(_address(c), token=ACME) as cc:
        tampered = _done(cc, "inc-x", "cf")
    assert tampered.state == v1.JOB_STATE_FAILED
    assert tampered.error.startswith("ArtefactError: ")
    assert "does not hold the acknowledged baseline" in tampered.error
