"""SidecarExporter against the real sidecar (create_server on 127.0.0.1, port 0 or a free port).

Covers: chunked upload, idempotent re-upload, non-retryable rejections counted, retry with
backoff (observable in stats), the disk spool (order, byte bound, restart pick-up, poison
entries), auth, and fork safety.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from integrations._metrics import RecorderMetrics
from integrations.exporters import ExportResult, SidecarExporter
from integrations.incident import Incident, IncidentBuilder, new_manifest
from sidecar import SidecarConfig, create_server
from sidecar.api import v1

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
#: A created_at no other test incident has: the same id with different bytes.
LATER = "2030-01-01T00:00:00+00:00"


def make_incident(i: int | str, *, numel: int = 12, tenant: str = "acme",
                  created_at: str | None = None) -> Incident:
    iid = f"inc-{i}"
    m = new_manifest(id=iid, created_at=created_at, model={"name": "tiny", "revision": None, "fingerprint": "ab" * 32},
                     request={"id": f"r-{i}", "tenant": tenant, "traceparent": TRACEPARENT},
                     trigger={"rule": "OnFlag", "reason": "test", "step": 0},
                     runtime={"python": "3.11"})
    b = IncidentBuilder(manifest=m)
    t = torch.arange(numel, dtype=torch.float32).reshape(1, -1)  # [batch, d]
    b.add(kind="activation", site="blocks.0.resid_post", module_path="h.0", step=0, tensor=t)
    return Incident.from_bytes(b.to_bytes())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_sidecar(data_dir: Path, *, port: int = 0, **cfg: object) -> Iterator[tuple[object, int]]:
    config = SidecarConfig.from_dict({"data_dir": str(data_dir), **cfg})
    srv, bound = create_server(config, port=port)
    srv.start()
    try:
        yield srv, bound
    finally:
        srv.stop(grace=0)


def stored_ids_in_receive_order(port: int) -> list[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = v1.IncidentServiceStub(ch)
        resp = stub.ListIncidents(v1.ListIncidentsRequest(order_by="received_at", page_size=1000),
                                  timeout=10)
    return [i.id for i in resp.incidents]


@pytest.fixture
def sidecar(tmp_path):
    with running_sidecar(tmp_path / "data") as (srv, port):
        yield srv, port


def fast(target: str, **kw: object) -> SidecarExporter:
    opts: dict[str, object] = {"deadline_s": 10.0, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}
    opts.update(kw)
    return SidecarExporter(target, **opts)  # type: ignore[arg-type]


def test_upload_is_chunked_durable_and_byte_identical(sidecar, tmp_path):
    srv, port = sidecar
    inc = make_incident("big", numel=700_000)  # 2.8 MB of float32: three chunks of <= 1 MiB
    assert inc.nbytes > 2 * 1024 * 1024
    ex = fast(f"127.0.0.1:{port}")
    assert ex.export(inc) is ExportResult.SUCCESS
    stored = Incident.open(srv.store.path(inc.id))
    assert stored.id == inc.id
    assert torch.equal(stored.tensor("blocks.0.resid_post", step=0),
                       inc.tensor("blocks.0.resid_post", step=0))
    assert srv.store.path(inc.id).read_bytes() == inc.to_bytes()
    assert ex.stats()["acked"] == 1 and ex.stats()["retries"] == 0
    row = srv.store.get(inc.id)
    assert row.traceparent == TRACEPARENT and row.tenant == "acme"
    ex.shutdown()


def test_reupload_of_the_same_incident_is_idempotent(sidecar):
    srv, port = sidecar
    inc = make_incident(1)
    ex = fast(f"127.0.0.1:{port}")
    assert ex.export(inc) is ExportResult.SUCCESS
    assert ex.export(inc) is ExportResult.SUCCESS
    assert ex.stats()["acked"] == 2
    assert srv.stats()["received"] == 1  # stored once
    ex.shutdown()


def test_different_bytes_under_a_known_id_is_dropped_not_retried(sidecar):
    srv, port = sidecar
    metrics = RecorderMetrics(registry=CollectorRegistry())
    ex = fast(f"127.0.0.1:{port}", metrics=metrics)
    assert ex.export(make_incident(1)) is ExportResult.SUCCESS
    other = make_incident(1, created_at=LATER)  # same id, different bytes
    assert ex.export(other) is ExportResult.FAILURE
    st = ex.stats()
    assert st["retries"] == 0 and st["dropped"] == {"export_failed": 1}
    assert metrics.snapshot()["dropped"] == {"export_failed": 1}
    assert ex.counts_own_drops
    assert srv.stats()["rejected"] == {"already_exists": 1}
    ex.shutdown()


def test_bad_token_is_unauthenticated_and_never_retried(tmp_path):
    auth = {"tokens": [{"token": "s3cret-token", "tenant": "acme"}]}
    with running_sidecar(tmp_path / "data", auth=auth) as (srv, port):
        bad = fast(f"127.0.0.1:{port}", token="wrong-token")
        assert bad.export(make_incident(1)) is ExportResult.FAILURE
        assert bad.stats()["retries"] == 0 and bad.stats()["dropped"] == {"export_failed": 1}
        good = fast(f"127.0.0.1:{port}", token="s3cret-token")
        assert good.export(make_incident(2)) is ExportResult.SUCCESS
        assert srv.store.get("inc-2").tenant == "acme"
        bad.shutdown()
        good.shutdown()


def test_unreachable_without_spool_retries_with_backoff_then_fails(tmp_path):
    metrics = RecorderMetrics(registry=CollectorRegistry())
    ex = fast(f"127.0.0.1:{free_port()}", max_retries=3, metrics=metrics)
    t0 = time.monotonic()
    assert ex.export(make_incident(1)) is ExportResult.FAILURE
    st = ex.stats()
    assert st["retries"] == 3
    assert 0 < st["backoff_s"] <= 3 * 0.05 and time.monotonic() - t0 >= st["backoff_s"]
    assert metrics.snapshot()["dropped"] == {"export_failed": 1}
    ex.shutdown()


def test_deadline_exceeded_is_retried_max_retries_times(sidecar):
    _srv, port = sidecar
    # a deadline no upload can meet (64 MiB of chunks in 1 ms): DEADLINE_EXCEEDED each time
    ex = fast(f"127.0.0.1:{port}", deadline_s=0.001, max_retries=2)
    assert ex.export(make_incident("slow", numel=200_000)) is ExportResult.FAILURE
    assert ex.stats()["retries"] == 2
    ex.shutdown()


def test_backoff_is_exponential_with_full_jitter_and_capped():
    ex = SidecarExporter("127.0.0.1:1", backoff_initial_s=0.2, backoff_max_s=10.0)
    for attempt, cap in [(0, 0.2), (1, 0.4), (3, 1.6), (10, 10.0), (60, 10.0)]:
        draws = [ex._backoff.delay(attempt) for _ in range(300)]
        assert all(0.0 <= d <= cap for d in draws)
        assert max(draws) > 0.8 * cap and min(draws) < 0.2 * cap  # full jitter: [0, cap]
    ex.shutdown()


def test_sidecar_comes_back_during_retries(tmp_path):
    port = free_port()
    ex = fast(f"127.0.0.1:{port}", max_retries=200, backoff_max_s=0.05)
    result: list[ExportResult] = []
    t = threading.Thread(target=lambda: result.append(ex.export(make_incident(1))))
    t.start()
    deadline = time.monotonic() + 30
    while ex.stats()["retries"] < 1 and time.monotonic() < deadline:  # it is retrying
        time.sleep(0.01)
    with running_sidecar(tmp_path / "data", port=port) as (srv, _):
        t.join(timeout=30)
        assert result == [ExportResult.SUCCESS]
        assert ex.stats()["retries"] >= 1
        assert srv.store.get("inc-1") is not None
    ex.shutdown()


def test_spool_while_down_then_drain_in_order(tmp_path):
    port = free_port()
    metrics = RecorderMetrics(registry=CollectorRegistry())
    ex = fast(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool", metrics=metrics)
    incs = [make_incident(i) for i in range(10)]
    for inc in incs:  # sidecar down: durable in the spool, export returns at once
        assert ex.export(inc) is ExportResult.SUCCESS
    st = ex.stats()
    assert st["spooled"] == 10 and st["spool_entries"] == 10
    assert metrics.spool_bytes._value.get() == sum(i.nbytes for i in incs) == st["spool_bytes"]
    assert ex.force_flush(timeout_s=0.2) is False  # nothing can drain yet
    with running_sidecar(tmp_path / "data", port=port) as (srv, _):
        assert ex.force_flush(timeout_s=30) is True
        assert stored_ids_in_receive_order(port) == [i.id for i in incs]
        for inc in incs:
            assert Incident.open(srv.store.path(inc.id)).to_bytes() == inc.to_bytes()
        # back to direct uploads once the spool is empty
        assert ex.export(make_incident(99)) is ExportResult.SUCCESS
        st = ex.stats()
        assert st["drained"] == 10 and st["acked"] == 1 and st["spool_entries"] == 0
        assert metrics.spool_bytes._value.get() == 0
        assert metrics.snapshot()["dropped"] == {}
    ex.shutdown()


def test_spool_byte_bound_drops_are_counted(tmp_path):
    one = make_incident(0).nbytes
    metrics = RecorderMetrics(registry=CollectorRegistry())
    ex = fast(f"127.0.0.1:{free_port()}", spool_dir=tmp_path / "spool",
              spool_max_bytes=int(2.5 * one), metrics=metrics)
    results = [ex.export(make_incident(i)) for i in range(5)]
    assert results == [ExportResult.SUCCESS] * 2 + [ExportResult.FAILURE] * 3
    assert metrics.snapshot()["dropped"] == {"spool_full": 3}
    assert ex.stats()["dropped"] == {"spool_full": 3} and ex.stats()["spool_entries"] == 2
    ex.shutdown(timeout_s=0.1)


def test_a_restarted_process_picks_up_the_spool(tmp_path):
    port = free_port()
    first = fast(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool")
    incs = [make_incident(i) for i in range(4)]
    for inc in incs:
        assert first.export(inc) is ExportResult.SUCCESS
    first.shutdown(timeout_s=0.1)  # leaves the spool on disk
    assert len(list((tmp_path / "spool").glob("*.arrow"))) == 4
    with running_sidecar(tmp_path / "data", port=port):
        second = fast(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool")  # drains on its own
        assert second.force_flush(timeout_s=30)
        assert stored_ids_in_receive_order(port) == [i.id for i in incs]
        assert second.stats()["drained"] == 4
        assert [p.name for p in (tmp_path / "spool").iterdir()] == [".drain.lock"]
        second.shutdown()


def test_processes_sharing_a_spool_upload_each_entry_once(tmp_path):
    port = free_port()
    a = fast(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool")
    b = fast(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool")  # own descriptor, own flock
    for i in range(6):
        assert (a if i % 2 else b).export(make_incident(i)) is ExportResult.SUCCESS
    with running_sidecar(tmp_path / "data", port=port):
        assert a.force_flush(timeout_s=30) and b.force_flush(timeout_s=30)
        assert stored_ids_in_receive_order(port) == [f"inc-{i}" for i in range(6)]
    assert a.stats()["drained"] + b.stats()["drained"] == 6  # one drainer: no duplicates
    a.shutdown()
    b.shutdown()


def test_a_rejected_spooled_incident_is_dropped_and_does_not_block_the_rest(tmp_path):
    port = free_port()
    metrics = RecorderMetrics(registry=CollectorRegistry())
    ex = fast(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool", metrics=metrics)
    with running_sidecar(tmp_path / "data", port=port):
        assert ex.export(make_incident("dup")) is ExportResult.SUCCESS  # stored directly
    poison = make_incident("dup", created_at=LATER)  # same id, other bytes: ALREADY_EXISTS later
    assert ex.export(poison) is ExportResult.SUCCESS  # sidecar down: spooled
    assert ex.export(make_incident("next")) is ExportResult.SUCCESS
    with running_sidecar(tmp_path / "data", port=port) as (srv, _):
        assert ex.force_flush(timeout_s=30)
        assert srv.store.get("inc-next") is not None
    assert metrics.snapshot()["dropped"] == {"export_failed": 1}
    assert ex.stats()["drained"] == 1
    ex.shutdown()


def test_export_after_shutdown_fails_and_is_counted():
    ex = SidecarExporter("127.0.0.1:1")
    ex.shutdown()
    ex.shutdown()  # idempotent
    assert ex.export(make_incident(1)) is ExportResult.FAILURE
    assert ex.stats()["dropped"] == {"shutdown": 1}


def test_channel_is_lazy_and_recreated_in_a_forked_child(sidecar):
    srv, port = sidecar
    ex = fast(f"127.0.0.1:{port}")
    assert ex._client._stub is None  # nothing connects before the first export
    assert ex.export(make_incident("parent")) is ExportResult.SUCCESS
    parent_stub = ex._client._stub
    child_inc = make_incident("child")
    pid = os.fork()
    if pid == 0:  # child: must build its own channel and still deliver
        code = 1
        try:
            ok = ex.export(child_inc) is ExportResult.SUCCESS
            code = 0 if ok and ex._client._stub is not parent_stub else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert srv.store.get("inc-child") is not None
    assert ex._client._stub is parent_stub  # the parent's channel is untouched and still works
    assert ex.export(make_incident("parent-2")) is ExportResult.SUCCESS
    ex.shutdown()


def test_mtls(tmp_path):
    pki = _make_pki(tmp_path)
    tls = {"cert_file": str(pki["server.crt"]), "key_file": str(pki["server.key"]),
           "client_ca_file": str(pki["ca.crt"]), "require_client_auth": True}
    with running_sidecar(tmp_path / "data", grpc={"address": "127.0.0.1:0", "tls": tls}) as (
            srv, port):
        ok = fast(f"localhost:{port}", tls={"root_certificates": pki["ca.crt"],
                                            "certificate_chain": pki["client.crt"],
                                            "private_key": pki["client.key"]})
        assert ok.export(make_incident(1)) is ExportResult.SUCCESS
        no_client_cert = fast(f"localhost:{port}", max_retries=0,
                              tls={"root_certificates": pki["ca.crt"]})
        assert no_client_cert.export(make_incident(2)) is ExportResult.FAILURE
        assert srv.store.get("inc-2") is None
        ok.shutdown()
        no_client_cert.shutdown()


def _make_pki(d: Path) -> dict[str, Path]:
    import subprocess

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    for name in ("server", "client"):
        run("req", *ec, "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext")
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}
