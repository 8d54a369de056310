"""The sidecar over real gRPC on 127.0.0.1 port 0, in-process: ingest, rejections, queries,
watch, analyses, auth + tenant isolation, health, limits, restart (TLS: test_sidecar_tls)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest

from integrations._crc32c import crc32c
from integrations.incident import Incident
from sidecar._client import SidecarClient, upload_requests
from sidecar._server import Sidecar, create_server
from sidecar.api import v1
from tests.integration.conftest import KiB, build_incident, make_config


def _stored(sc: Sidecar) -> tuple[list[str], int]:
    files = sorted(p.relative_to(sc.store.incidents_dir).as_posix()
                   for p in sc.store.incidents_dir.rglob("*") if p.is_file())
    return files, sc.store.index.count_incidents("TRUE", [])


def test_upload_query_download_delete(serve: Callable[..., tuple[Sidecar, str]]) -> None:
    sc, addr = serve()
    data = build_incident("inc-1", n_sites=3)
    with SidecarClient(addr) as c:
        r = c.upload("inc-1", data, chunk_size=1000)
        assert (r.incident_id, r.size, r.created) == ("inc-1", len(data), True)
        digest = Incident.from_bytes(data).manifest["integrity"]["sha256"]
        assert (r.crc32c, r.content_sha256, r.sha256) == (crc32c(data), digest, "")
        again = c.upload("inc-1", data)                       # idempotent retry
        assert not again.created and again.crc32c == r.crc32c
        old = c.upload("inc-1", data, content_sha256=None)    # ... by an older client too
        assert not old.created and old.sha256 in ("", hashlib.sha256(data).hexdigest())
        assert sc.store.verifier.wait_idle(30)
        checked = c.get("inc-1")                               # checked after the ack
        assert (checked.integrity, checked.sha256) == ("verified",
                                                       hashlib.sha256(data).hexdigest())
        with pytest.raises(grpc.RpcError) as e:
            c.upload("inc-1", build_incident("inc-1", seed=7))
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        inc = c.get("inc-1", full=True)
        assert (inc.tenant, inc.model_name, inc.n_sites, inc.trigger_rule) == \
            ("acme", "tiny-gpt2", 3, "flag")
        assert '"id":"inc-1"' in inc.manifest_json and not c.get("inc-1").manifest_json
        assert c.download("inc-1") == data
        assert Incident.from_bytes(c.download("inc-1")).sites() == \
            [f"blocks.{i}.resid_post" for i in range(3)]
        c.delete("inc-1")
        for call in (lambda: c.get("inc-1"), lambda: c.delete("inc-1"),
                     lambda: c.download("inc-1")):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert _stored(sc) == ([], 0)
    assert sc.stats()["received"] == 1
    assert sc.stats()["rejected"] == {"already_exists": 1, "not_found": 3}   # each one counted


def _truncated(data: bytes) -> bytes:
    return data[: len(data) - 100]


def _wrong_schema() -> bytes:
    table = pa.table({"kind": pa.array(["x"]), "payload": pa.array([b"1"])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _messages(case: str, data: bytes) -> list[v1.UploadIncidentRequest]:
    msgs = list(upload_requests("inc-1", data, chunk_size=16 * KiB))
    if case == "oversized_chunk":
        big = b"\0" * (64 * KiB + 1)
        return [*msgs[:1], v1.UploadIncidentRequest(chunk=v1.Chunk(data=big))]
    if case == "oversized_total":
        return list(upload_requests("inc-1", b"\0" * (1024 * KiB + 1), chunk_size=64 * KiB))
    if case == "wrong_sha256":
        return list(upload_requests("inc-1", data, sha256="0" * 64))
    if case == "no_header":
        return msgs[1:]
    if case == "no_trailer":
        return msgs[:-1]
    if case == "short":
        h = v1.UploadIncidentRequest(header=v1.UploadHeader(incident_id="inc-1",
                                                            total_size=len(data) + 5))
        return [h, *msgs[1:]]
    if case == "bad_id":
        return list(upload_requests("../../etc/passwd", data))
    if case == "truncated":
        return list(upload_requests("inc-1", _truncated(data)))
    if case == "non_arrow":
        return list(upload_requests("inc-1", b"GET / HTTP/1.1\r\n" * 64))
    if case == "wrong_schema":
        return list(upload_requests("inc-1", _wrong_schema()))
    if case == "id_mismatch":
        return list(upload_requests("inc-2", data))
    if case == "corrupt_tensor":   # sha256 protocol (older clients): the rows are checked
        bad = bytearray(data)     # before the ack; valid framing and transport sha256
        bad[len(data) - 100] ^= 0x40   # inside the last tensor's bytes
        return list(upload_requests("inc-1", bytes(bad), chunk_size=16 * KiB,
                                    content_sha256=None))
    return _crc_messages(case, data, msgs)


def _crc_messages(case: str, data: bytes,
                  msgs: list[v1.UploadIncidentRequest]) -> list[v1.UploadIncidentRequest]:
    """Attacks on the CRC32C protocol (``msgs``: a correct upload of ``data``)."""
    if case == "wrong_chunk_crc":    # a chunk altered in transit: its own CRC32C catches it
        chunk = msgs[-2].chunk
        assert chunk.HasField("crc32c")
        bad = v1.Chunk(data=bytes([chunk.data[0] ^ 1]) + chunk.data[1:], crc32c=chunk.crc32c)
        return [*msgs[:-2], v1.UploadIncidentRequest(chunk=bad), msgs[-1]]
    if case == "wrong_trailer_crc":
        return list(upload_requests("inc-1", data, crc32c=12345))
    if case == "no_trailer_crc":
        return [*msgs[:-1], v1.UploadIncidentRequest(trailer=v1.UploadTrailer())]
    if case == "malformed_content_digest":
        return list(upload_requests("inc-1", data, content_sha256="Z" * 64))
    if case == "foreign_content_digest":   # well-formed, but not the manifest's
        return list(upload_requests("inc-1", data, content_sha256="0" * 64))
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "code", "reason"), [
    ("oversized_chunk", grpc.StatusCode.RESOURCE_EXHAUSTED, "chunk_too_large"),
    ("oversized_total", grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"),
    ("wrong_sha256", grpc.StatusCode.DATA_LOSS, "sha256_mismatch"),
    ("no_header", grpc.StatusCode.INVALID_ARGUMENT, "bad_framing"),
    ("no_trailer", grpc.StatusCode.INVALID_ARGUMENT, "bad_framing"),
    ("short", grpc.StatusCode.INVALID_ARGUMENT, "size_mismatch"),
    ("bad_id", grpc.StatusCode.INVALID_ARGUMENT, "bad_id"),
    ("truncated", grpc.StatusCode.INVALID_ARGUMENT, "invalid_incident"),
    ("non_arrow", grpc.StatusCode.INVALID_ARGUMENT, "invalid_incident"),
    ("wrong_schema", grpc.StatusCode.INVALID_ARGUMENT, "invalid_incident"),
    ("id_mismatch", grpc.StatusCode.INVALID_ARGUMENT, "invalid_incident"),
    ("corrupt_tensor", grpc.StatusCode.INVALID_ARGUMENT, "invalid_incident"),
    ("wrong_chunk_crc", grpc.StatusCode.DATA_LOSS, "crc32c_mismatch"),
    ("wrong_trailer_crc", grpc.StatusCode.DATA_LOSS, "crc32c_mismatch"),
    ("no_trailer_crc", grpc.StatusCode.INVALID_ARGUMENT, "bad_framing"),
    ("malformed_content_digest", grpc.StatusCode.INVALID_ARGUMENT, "bad_framing"),
    ("foreign_content_digest", grpc.StatusCode.INVALID_ARGUMENT, "invalid_incident"),
])
def test_rejections_are_specific_counted_and_write_nothing(
        serve: Callable[..., tuple[Sidecar, str]], case: str, code: grpc.StatusCode,
        reason: str) -> None:
    sc, addr = serve()
    data = build_incident("inc-1", n_sites=4)
    with SidecarClient(addr) as c, pytest.raises(grpc.RpcError) as e:
        c.stub.UploadIncident(iter(_messages(case, data)), timeout=10)
    assert e.value.code() == code, e.value.details()
    assert dict(e.value.trailing_metadata() or ())["forensics-reject-reason"] == reason
    assert sc.stats()["rejected"] == {reason: 1}
    assert _stored(sc) == ([], 0)
    assert not list(sc.store.incidents_dir.glob(".*.tmp"))


def test_content_corrupted_before_the_crc_is_acked_then_quarantined_and_counted(
        serve: Callable[..., tuple[Sidecar, str]]) -> None:
    """CRC32C protocol: bytes that pass the transport check but not the incident's own digest
    (corrupted before the middleware took the CRC) are acknowledged, then quarantined."""
    sc, addr = serve()
    data = build_incident("inc-1", n_sites=4)
    digest = Incident.from_bytes(data).manifest["integrity"]["sha256"]
    bad = bytearray(data)
    bad[len(data) - 100] ^= 0x40
    with SidecarClient(addr) as c:
        r = c.upload("inc-1", bytes(bad), content_sha256=digest)
        assert r.created and r.crc32c == crc32c(bytes(bad))
        assert sc.store.verifier.wait_idle(30)
        with pytest.raises(grpc.RpcError) as e:
            c.get("inc-1")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert sc.stats()["quarantined"] == {"content_digest_mismatch": 1}
    assert sorted(p.name for p in (sc.store.quarantine_dir / "t-acme").iterdir()) == \
        ["inc-1.arrow", "inc-1.reason.json"]
    assert _stored(sc) == ([], 0)


def test_download_of_a_pending_incident_checks_it_first(
        serve: Callable[..., tuple[Sidecar, str]]) -> None:
    sc, addr = serve()
    sc.store.verifier.close()          # the background check has not run yet
    data = build_incident("inc-1", n_sites=2)
    with SidecarClient(addr) as c:
        c.upload("inc-1", data)
        assert c.get("inc-1").integrity == "pending"
        assert [i.id for i in c.list(filter='integrity = "pending"').incidents] == ["inc-1"]
        assert c.download("inc-1") == data     # announced sha256 verified by the client
        assert c.get("inc-1").integrity == "verified"
        assert not c.list(filter='integrity = "pending"').incidents


def test_list_filter_order_paging(serve: Callable[..., tuple[Sidecar, str]]) -> None:
    sc, addr = serve()
    base = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    with SidecarClient(addr) as c:
        for i in range(7):
            c.upload(f"inc-{i}", build_incident(
                f"inc-{i}", tenant="acme" if i % 2 else "globex", n_sites=1 + i % 3,
                created_at=(base + dt.timedelta(days=i)).isoformat()))
        page = c.list(order_by="created_at desc", page_size=3)
        assert [i.id for i in page.incidents] == ["inc-6", "inc-5", "inc-4"]
        assert page.total_size == 7 and page.next_page_token
        ids = [i.id for i in c.list_all(order_by="created_at", page_size=3)]
        assert ids == [f"inc-{i}" for i in range(7)]
        page = c.list(filter='tenant = "acme" AND created_at >= "2025-01-03T00:00:00Z"',
                      order_by="id")
        assert [i.id for i in page.incidents] == ["inc-3", "inc-5"] and not page.next_page_token
        assert [i.id for i in c.list(filter="n_sites = 3 OR n_sites = 1", order_by="id")
                .incidents] == ["inc-0", "inc-2", "inc-3", "inc-5", "inc-6"]
        token = c.list(filter='tenant = "acme"', page_size=1).next_page_token
        bad = [
            ({"filter": "tenant = 'a'; DROP TABLE incidents"}, "position 13"),
            ({"filter": "sha256 = x OR 1=1"}, "position 15"),
            ({"order_by": "created_at; DROP TABLE incidents"}, "order_by"),
            ({"filter": 'tenant = "globex"', "page_token": token}, "different filter"),
            ({"page_size": -1}, "page_size"),
        ]
        for kwargs, fragment in bad:
            with pytest.raises(grpc.RpcError) as e:
                c.list(**kwargs)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in (e.value.details() or "")
    assert sc.stats()["rejected"] == {"bad_filter": len(bad)}
    assert sc.store.index.count_incidents("TRUE", []) == 7        # the table is still there


def test_watch_streams_new_matching_incidents(serve: Callable[..., tuple[Sidecar, str]]) -> None:
    sc, addr = serve()
    got: list[str] = []
    ready = threading.Event()
    with SidecarClient(addr) as c:
        call = c.stub.WatchIncidents(v1.WatchIncidentsRequest(filter='tenant = "acme"'),
                                     timeout=20)

        def consume() -> None:
            ready.set()
            try:
                for msg in call:
                    got.append(msg.incident.id)
                    if len(got) == 2:
                        call.cancel()
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.CANCELLED

        t = threading.Thread(target=consume)
        t.start()
        ready.wait()
        while not sc.store._subs:           # the server subscribed
            threading.Event().wait(0.01)
        c.upload("inc-1", build_incident("inc-1", tenant="globex"))
        c.upload("inc-2", build_incident("inc-2", tenant="acme"))
        c.upload("inc-3", build_incident("inc-3", tenant="acme"))
        t.join(10)
    assert got == ["inc-2", "inc-3"]
    with SidecarClient(addr) as c, pytest.raises(grpc.RpcError) as e:
        next(iter(c.watch(filter="tenant == x", timeout_s=5)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_watch_deadline_is_honoured(serve: Callable[..., tuple[Sidecar, str]]) -> None:
    sc, addr = serve()
    with SidecarClient(addr) as c, pytest.raises(grpc.RpcError) as e:
        list(c.watch(timeout_s=0.3))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(300):                   # the server side notices and unsubscribes
        if not sc.store._subs:
            break
        threading.Event().wait(0.01)
    assert not sc.store._subs


def test_analyses_over_grpc(serve: Callable[..., tuple[Sidecar, str]]) -> None:
    sc, addr = serve(jobs={"on_ingest": ["stats"]})
    with SidecarClient(addr) as c:
        c.upload("inc-1", build_incident("inc-1"))
        autos = {a.kind: a for a in c.list_analyses("inc-1")}
        assert set(autos) == {"stats", "cf"}        # jobs.on_ingest + modules.cf.enabled
        auto = autos["stats"]
        cf = sc.jobs.wait(autos["cf"].analysis_id, timeout_s=60)
        assert cf.state == "done" and cf.result is not None
        assert cf.result["status"] == "no_baseline" and cf.result["anomaly_score"] is None
        job = c.run_analysis("inc-1", "stats", params_json='{"kinds": ["activation"]}')
        assert job.state in (v1.JOB_STATE_PENDING, v1.JOB_STATE_RUNNING, v1.JOB_STATE_DONE)
        for a in (auto, job):
            sc.jobs.wait(a.analysis_id, timeout_s=30)
            done = c.get_analysis(a.analysis_id)
            assert done.state == v1.JOB_STATE_DONE and done.finished_at.seconds > 0
            assert '"n_tensors": 2' in done.result_json
        for kwargs, code in (({"kind": "nope"}, grpc.StatusCode.INVALID_ARGUMENT),
                             ({"kind": "stats", "params_json": "[1]"},
                              grpc.StatusCode.INVALID_ARGUMENT),
                             ({"kind": "stats", "params_json": "{bad"},
                              grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as e:
                c.run_analysis("inc-1", **kwargs)
            assert e.value.code() == code
        with pytest.raises(grpc.RpcError) as e:
            c.run_analysis("inc-404", "stats")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


TOKENS = {"acme": "acme-token-123", "globex": "globex-token-456", "admin": "admin-token-789"}


def test_auth_and_tenant_isolation(serve: Callable[..., tuple[Sidecar, str]]) -> None:
    sc, addr = serve(auth={"tokens": [{"tenant": "acme", "token": TOKENS["acme"]},
                                      {"tenant": "globex", "token": TOKENS["globex"]}],
                           "admin_tokens": [TOKENS["admin"]]})
    acme = SidecarClient(addr, token=TOKENS["acme"])
    globex = SidecarClient(addr, token=TOKENS["globex"])
    admin = SidecarClient(addr, token=TOKENS["admin"])
    anon = SidecarClient(addr)
    wrong = SidecarClient(addr, token="acme-token-12")
    try:
        for c in (anon, wrong):
            for call in (lambda c=c: c.upload("inc-x", build_incident("inc-x")),
                         lambda c=c: c.list(), lambda c=c: list(c.watch(timeout_s=2))):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the manifest says tenant "globex" but the token decides
        assert acme.upload("inc-a", build_incident("inc-a", tenant="globex")).created
        assert globex.upload("inc-g", build_incident("inc-g", tenant="acme")).created
        with pytest.raises(grpc.RpcError) as e:
            acme.upload("inc-b", build_incident("inc-b"), tenant="globex")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert [i.id for i in acme.list().incidents] == ["inc-a"]
        assert [i.id for i in globex.list(filter='tenant = "acme"').incidents] == []
        assert sorted(i.id for i in admin.list().incidents) == ["inc-a", "inc-g"]
        assert acme.get("inc-a").tenant == "acme"
        for call in (lambda: globex.get("inc-a"), lambda: globex.download("inc-a"),
                     lambda: globex.delete("inc-a"), lambda: globex.run_analysis("inc-a", "stats"),
                     lambda: globex.list_analyses("inc-a")):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        job = acme.run_analysis("inc-a", "stats")
        with pytest.raises(grpc.RpcError) as e:
            globex.get_analysis(job.analysis_id)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert admin.get_analysis(job.analysis_id).incident_id == "inc-a"
        admin.delete("inc-g")
        assert [i.id for i in globex.list().incidents] == []
    finally:
        for c in (acme, globex, admin, anon, wrong):
            c.close()
    rejected = sc.stats()["rejected"]
    assert rejected["unauthenticated"] == 6 and rejected["permission_denied"] == 1


def test_health_and_graceful_shutdown(serve: Callable[..., tuple[Sidecar, str]]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sc, addr = serve(auth={"tokens": [{"tenant": "a", "token": "a-token-123"}]})
    with grpc.insecure_channel(addr) as ch:              # probes need no token
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "forensics.v1.IncidentService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    sc.stop(grace=0.5)
    resp = sc.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_max_concurrent_rpcs(serve: Callable[..., tuple[Sidecar, str]]) -> None:
    sc, addr = serve(grpc={"max_concurrent_rpcs": 1})
    with SidecarClient(addr) as c:
        call = c.stub.WatchIncidents(v1.WatchIncidentsRequest(), timeout=10)
        while not sc.store._subs:
            threading.Event().wait(0.01)
        with pytest.raises(grpc.RpcError) as e:
            c.list()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        call.cancel()


def test_restart_keeps_incidents_and_resumes_jobs(tmp_path: Path) -> None:
    cfg = dataclasses.replace(make_config(tmp_path), jobs=dataclasses.replace(
        make_config(tmp_path).jobs, poll_interval_s=0.05))
    with create_server(cfg, port=0)[0] as sc, SidecarClient(sc.address) as c:
        data = build_incident("inc-1")
        c.upload("inc-1", data)
        sc.jobs.stop()                                    # jobs stay pending
        pending = c.run_analysis("inc-1", "stats")
    with create_server(cfg, port=0)[0] as sc2, SidecarClient(sc2.address) as c:
        assert c.download("inc-1") == data
        sc2.jobs.wait(pending.analysis_id, timeout_s=30)
        assert c.get_analysis(pending.analysis_id).state == v1.JOB_STATE_DONE


def test_analyses_that_could_not_be_enqueued_are_back_filled(
        serve: Callable[..., tuple[Sidecar, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog stops answering between indexing an incident and enqueuing its analyses
    (a shared catalog restarting; injected here, since that window cannot be timed against a
    real server): the upload is still acknowledged, the incident is marked for the back-fill,
    whose pass — kept while the catalog is still down — enqueues the analyses once it answers."""
    from integrations.errors import CatalogUnavailableError

    sc, addr = serve(jobs={"on_ingest": ["stats"]}, catalog={"backfill_interval_s": 3600})
    real_submit, down = sc.jobs.submit, [True]

    def submit(*args: Any, **kwargs: Any) -> Any:
        if down[0]:
            raise CatalogUnavailableError("the shared incident catalog is unreachable (test)")
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(sc.jobs, "submit", submit)
    with SidecarClient(addr) as c:
        assert c.upload("inc-1", build_incident("inc-1")).created
        assert c.list_analyses("inc-1") == []
        assert sc.store.backfill.pending() == [("acme", "inc-1")]
        assert sc.store.backfill.run_once() == 0            # still down: the marker stays
        assert sc.store.backfill.pending() == [("acme", "inc-1")]
        down[0] = False
        assert sc.store.backfill.run_once() == 1
        assert sc.store.backfill.pending() == []
        kinds = sorted(a.kind for a in c.list_analyses("inc-1"))
        assert kinds == ["cf", "stats"]
        assert sc.store.backfill.run_once() == 0            # enqueued once, not again
        assert sorted(a.kind for a in c.list_analyses("inc-1")) == kinds


def test_a_retried_upload_enqueues_what_the_failed_attempt_did_not(
        serve: Callable[..., tuple[Sidecar, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """An attempt that stored the incident and then failed (here: announcing it to watchers
    raises once) never enqueued its analyses; the exporter's retry finds the incident stored
    (created=False) and must enqueue them — once, however often it is retried."""
    sc, addr = serve(jobs={"on_ingest": ["stats"]})
    real, fail = sc.store._publish, [True]

    def publish(row: Any) -> None:
        if fail[0]:
            fail[0] = False
            raise RuntimeError("injected: the attempt fails after the incident is stored")
        real(row)

    monkeypatch.setattr(sc.store, "_publish", publish)
    data = build_incident("inc-1")
    with SidecarClient(addr) as c:
        with pytest.raises(grpc.RpcError):
            c.upload("inc-1", data)
        assert c.list_analyses("inc-1") == []
        for _ in range(2):
            assert not c.upload("inc-1", data).created
        assert sorted(a.kind for a in c.list_analyses("inc-1")) == ["cf", "stats"]
