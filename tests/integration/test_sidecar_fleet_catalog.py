"""Two sidecar PROCESSES on one real PostgreSQL catalog (DESIGN §12; issue 16's bar), sharing one
incident-file directory (a local directory here; object storage is the ``store.uri`` seam's
test): an incident uploaded to either is listed, downloaded and analysed through the other,
tenant-scoped; and the catalog going down mid-stream loses no acknowledged incident."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from sidecar._client import SidecarClient
from sidecar.api import v1
from tests.integration.conftest import SidecarProcess, build_incident

pytestmark = pytest.mark.slow

TOKENS = [{"tenant": "acme", "token": "acme-token-123"},
          {"tenant": "globex", "token": "globex-token-456"}]


def _config(tmp_path: Path, name: str, shared: Path) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "data_dir": str(shared), "grpc": {"address": "127.0.0.1:0"},
        "metrics": {"enabled": False}, "auth": {"tokens": TOKENS},
        "jobs": {"poll_interval_s": 0.1},
        "catalog": {"kind": "postgres", "dsn_env": "FORENSICS_CATALOG_DSN",
                    "connect_timeout_s": 2, "backfill_interval_s": 1}}))
    return path


def _address(proc: SidecarProcess) -> str:
    found = re.search(r"listening on (127\.0\.0\.1:\d+)", proc.log.read_text(errors="replace"))
    assert found, proc.log.read_text(errors="replace")
    return found.group(1)


@pytest.fixture
def fleet(tmp_path: Path, pg_dsn: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """``start(name)`` → the address of a new sidecar process on the shared catalog and
    directory; all are stopped at teardown."""
    monkeypatch.setenv("FORENSICS_CATALOG_DSN", pg_dsn)
    shared = tmp_path / "shared"
    procs: list[SidecarProcess] = []

    def start(name: str) -> str:
        proc = SidecarProcess(_config(tmp_path, name, shared), tmp_path / f"{name}.log").start()
        procs.append(proc)
        return _address(proc)

    yield start
    for proc in procs:
        proc.__exit__()


def _wait_done(client: SidecarClient, analysis_id: str, timeout_s: float = 60) -> v1.Analysis:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get_analysis(analysis_id)
        if job.state in (v1.JOB_STATE_DONE, v1.JOB_STATE_FAILED) or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_two_sidecars_share_one_catalog_tenant_scoped(fleet: Callable[[str], str]) -> None:
    a, b = fleet("a"), fleet("b")
    data = {"inc-a": build_incident("inc-a"), "inc-b": build_incident("inc-b", seed=1)}
    with SidecarClient(a, token="acme-token-123") as ca, \
            SidecarClient(b, token="acme-token-123") as cb:
        assert ca.upload("inc-a", data["inc-a"]).created
        assert cb.upload("inc-b", data["inc-b"]).created
        for client, other in ((cb, "inc-a"), (ca, "inc-b")):   # through the other sidecar
            listed = client.list(order_by="id")
            assert [i.id for i in listed.incidents] == ["inc-a", "inc-b"]
            assert listed.total_size == 2
            assert client.get(other).tenant == "acme"
            assert client.download(other) == data[other]
            job = client.run_analysis(other, "stats")
            done = _wait_done(client, job.analysis_id)
            assert done.state == v1.JOB_STATE_DONE, done.error
            assert f'"incident_id": "{other}", "n_tensors": 2' in done.result_json
    for addr in (a, b):
        with SidecarClient(addr, token="globex-token-456") as cg:
            assert list(cg.list().incidents) == []
            for call in (lambda: cg.get("inc-a"), lambda: cg.download("inc-b"),
                         lambda: cg.run_analysis("inc-a", "stats")):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_catalog_down_mid_stream_loses_no_acknowledged_incident(
        fleet: Callable[[str], str], postgres_server) -> None:  # type: ignore[no-untyped-def]
    a, b = fleet("a"), fleet("b")
    acked: list[str] = []
    with SidecarClient(a, token="acme-token-123") as ca, \
            SidecarClient(b, token="acme-token-123") as cb:
        try:
            for i in range(30):
                if i == 10:
                    postgres_server.stop()
                    with pytest.raises(grpc.RpcError) as err:
                        cb.list()
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "unreachable" in (err.value.details() or "")
                if i == 20:
                    postgres_server.start()
                resp = ca.upload(f"s-{i}", build_incident(f"s-{i}", seed=i))
                assert resp.created
                acked.append(resp.incident_id)
        finally:
            if not _up(postgres_server):
                postgres_server.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = {i.id for i in cb.list_all()}
            if listed >= set(acked):
                break
            time.sleep(0.5)
        assert set(acked) - listed == set(), "acknowledged incidents missing after back-fill"
        assert len(acked) == 30


def _up(server) -> bool:  # type: ignore[no-untyped-def]
    import psycopg

    try:
        psycopg.connect(server.dsn(), connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True
