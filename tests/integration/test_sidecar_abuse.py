"""The fault-and-abuse probe of issue 14, one attack per test, against a real sidecar on loopback.

Each attack is answered with a specific status, counted by reason, and stores nothing:
decompression bombs, hostile manifests, forged page tokens, extreme filters, stalled and endless
upload streams, over-size chunks, and FULL views of large manifests.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pyarrow as pa
import pytest
import torch

from integrations.incident import MANIFEST_KEY, IncidentBuilder, new_manifest
from sidecar._client import SidecarClient, upload_requests
from sidecar._filters import encode_page_token, query_key
from sidecar._server import Sidecar
from sidecar.api import v1
from tests.integration.conftest import KiB, build_incident

Serve = Callable[..., tuple[Sidecar, str]]
MiB = 1024 * KiB


def _with_manifest(data: bytes, change: Callable[[dict[str, Any]], Any]) -> bytes:
    reader = pa.ipc.open_stream(data)
    manifest = json.loads(reader.schema.metadata[MANIFEST_KEY])
    raw = change(manifest)
    text = raw if isinstance(raw, bytes) else json.dumps(manifest).encode()
    schema = reader.schema.with_metadata({MANIFEST_KEY: text})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        for batch in reader:
            w.write_batch(batch.replace_schema_metadata(schema.metadata))
    return bytes(sink.getvalue().to_pybytes())


def _refused(addr: str, incident_id: str, data: bytes) -> grpc.RpcError:
    with SidecarClient(addr) as c, pytest.raises(grpc.RpcError) as e:
        c.stub.UploadIncident(upload_requests(incident_id, data, chunk_size=32 * KiB),
                              timeout=10)
    return e.value


def _reason(err: grpc.RpcError) -> str:
    return dict(err.trailing_metadata() or ())["forensics-reject-reason"]


def _nothing_stored(sc: Sidecar) -> bool:
    return not sc.store.index.incident_ids() and not list(sc.store.incidents_dir.iterdir())


def test_zstd_bomb_is_refused_before_inflation(serve: Serve) -> None:
    sc, addr = serve(limits={"max_decoded_bytes": 8 * MiB})
    b = IncidentBuilder(manifest=new_manifest(id="bomb"))
    b.add(kind="activation", site="blocks.0.resid_post", module_path="h.0", step=0,
          tensor=torch.zeros(1, 8 * 1024, 1024))                  # 32 MiB of zeros
    bomb = b.to_bytes(compression="zstd")
    assert len(bomb) < 16 * KiB
    err = _refused(addr, "bomb", bomb)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _reason(err) == "decoded_too_large" and "max_decoded_bytes" in (err.details() or "")
    assert sc.stats()["rejected"] == {"decoded_too_large": 1} and _nothing_stored(sc)


@pytest.mark.parametrize(("change", "code", "reason", "says"), [
    (lambda m: m.update(created_at="0001-01-01T00:00:00+14:00"),
     grpc.StatusCode.INVALID_ARGUMENT, "invalid_incident", "outside years 1-9999"),
    (lambda m: b"[" * 100_000 + b"]" * 100_000,
     grpc.StatusCode.INVALID_ARGUMENT, "invalid_incident", "max_manifest_depth"),
    (lambda m: b"[" * 200_000 + b"]" * 200_000,      # 400 KB: refused by size before parsing
     grpc.StatusCode.RESOURCE_EXHAUSTED, "decoded_too_large", "max_manifest_bytes"),
    (lambda m: m.update(padding="x" * (512 * KiB)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "decoded_too_large", "max_manifest_bytes"),
], ids=["year1_plus14", "nested_100k", "nested_200k", "manifest_512k"])
def test_hostile_manifests_get_a_typed_counted_status(
        serve: Serve, change: Callable[[dict[str, Any]], Any], code: grpc.StatusCode,
        reason: str, says: str) -> None:
    sc, addr = serve()
    err = _refused(addr, "inc-1", _with_manifest(build_incident("inc-1"), change))
    assert err.code() == code and says in (err.details() or "")
    assert _reason(err) == reason and sc.stats()["rejected"] == {reason: 1}
    assert _nothing_stored(sc)


@pytest.mark.parametrize("query", [
    {"page_token": encode_page_token(2**63, query_key("", "", "*"))},
    {"page_token": encode_page_token(2**53, query_key("", "", "*"))},
    {"page_token": base64.urlsafe_b64encode(b"[" * 100_000).decode()},
    {"filter": 'created_at > "0001-01-01T00:00:00+14:00"'},
    {"filter": 'received_at < "9999-12-31T23:59:59-14:00"'},
    {"filter": "size_bytes > 99999999999999999999"},
], ids=["offset_2_63", "offset_2_53", "nested_token", "year1_plus14", "year9999_minus14",
        "int_overflow"])
def test_forged_tokens_and_extreme_filters_are_invalid_argument(serve: Serve,
                                                                query: dict[str, str]) -> None:
    sc, addr = serve()
    with SidecarClient(addr) as c:
        c.upload("inc-1", build_incident("inc-1"))
        with pytest.raises(grpc.RpcError) as e:
            c.stub.ListIncidents(v1.ListIncidentsRequest(**query), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert _reason(e.value) == "bad_filter" and sc.stats()["rejected"] == {"bad_filter": 1}


def _stalled(release: threading.Event) -> Iterator[v1.UploadIncidentRequest]:
    """An upload that sends its header, then nothing until ``release``."""
    yield v1.UploadIncidentRequest(header=v1.UploadHeader(incident_id="stall", total_size=10))
    release.wait(30)


def _first_done(calls: list[Any], n: int, *, timeout_s: float) -> list[Any]:
    """The first ``n`` of ``calls`` to finish (in any order), waiting up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [f for f in calls if f.done()]
        if len(done) >= n:
            return done
        time.sleep(0.02)
    raise AssertionError(f"only {sum(f.done() for f in calls)} of {len(calls)} uploads "
                         f"finished in {timeout_s} s; expected {n} refused at once")


def test_sixteen_stalled_uploads_leave_health_and_queries_answering(serve: Serve) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sc, addr = serve()                   # grpc.max_workers 16, limits.max_concurrent_uploads 8
    release = threading.Event()
    with SidecarClient(addr) as c:
        calls = [c.stub.UploadIncident.future(_stalled(release), timeout=30) for _ in range(16)]
        try:
            refused = _first_done(calls, 8, timeout_s=20)   # whichever 8 arrived last
            busy = [f.exception() for f in refused]
            assert {e.code() for e in busy} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert {_reason(e) for e in busy} == {"busy"}
            held = [f for f in calls if f not in refused]
            health = health_pb2_grpc.HealthStub(c.channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert c.stub.ListIncidents(v1.ListIncidentsRequest(), timeout=5).total_size == 0
            assert not any(f.done() for f in held)                   # still holding slots
        finally:
            release.set()
        for f in held:
            assert f.exception(timeout=10).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sc.stats()["rejected"] == {"busy": 8, "bad_framing": 8}
    assert sc.servicer.guard.active() == 0


def test_an_idle_upload_is_cancelled_and_counted(serve: Serve) -> None:
    # 1 s: long enough that the next, healthy upload never idles that long on a loaded CI box
    sc, addr = serve(limits={"idle_timeout_s": 1.0})
    release = threading.Event()
    with SidecarClient(addr) as c:
        try:
            err = c.stub.UploadIncident.future(_stalled(release), timeout=30).exception(timeout=10)
        finally:
            release.set()
        assert err.code() == grpc.StatusCode.CANCELLED
        assert c.upload("inc-1", build_incident("inc-1")).created    # the slot is free again
    assert sc.stats()["rejected"] == {"idle_timeout": 1}


def test_endless_empty_chunks_hit_the_message_cap(serve: Serve) -> None:
    sc, addr = serve(limits={"max_stream_messages": 50})

    def endless() -> Iterator[v1.UploadIncidentRequest]:
        yield v1.UploadIncidentRequest(header=v1.UploadHeader(incident_id="e", total_size=10))
        for _ in range(100_000):
            yield v1.UploadIncidentRequest(chunk=v1.Chunk(data=b""))

    with SidecarClient(addr) as c, pytest.raises(grpc.RpcError) as e:
        c.stub.UploadIncident(endless(), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sc.stats()["rejected"] == {"too_many_messages": 1}


def test_a_chunk_far_over_the_cap_is_counted_as_chunk_too_large(serve: Serve) -> None:
    sc, addr = serve()                                   # limits.max_chunk_bytes = 64 KiB
    data = build_incident("inc-1")

    def big() -> Iterator[v1.UploadIncidentRequest]:
        yield v1.UploadIncidentRequest(header=v1.UploadHeader(incident_id="inc-1",
                                                              total_size=900 * KiB))
        yield v1.UploadIncidentRequest(chunk=v1.Chunk(data=data + bytes(900 * KiB - len(data))))

    with SidecarClient(addr) as c, pytest.raises(grpc.RpcError) as e:
        c.stub.UploadIncident(big(), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sc.stats()["rejected"] == {"chunk_too_large": 1}


def test_full_view_pages_by_bytes_at_documented_page_sizes(serve: Serve) -> None:
    _, addr = serve(limits={"max_response_bytes": MiB})
    with SidecarClient(addr) as c:
        for i in range(12):
            data = _with_manifest(build_incident(f"inc-{i:02d}"),
                                  lambda m: m.update(notes="n" * (200 * KiB)))
            c.upload(f"inc-{i:02d}", _reindexed(data, f"inc-{i:02d}"), chunk_size=32 * KiB)
        seen, token, pages = [], "", 0
        while True:
            page = c.stub.ListIncidents(v1.ListIncidentsRequest(
                page_size=1000, page_token=token, view=v1.INCIDENT_VIEW_FULL,
                order_by="id"), timeout=10)
            assert page.ByteSize() <= MiB and page.total_size == 12
            assert all(len(i.manifest_json) > 200 * KiB for i in page.incidents)
            seen += [i.id for i in page.incidents]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == [f"inc-{i:02d}" for i in range(12)] and pages >= 3
        assert len(c.get("inc-03", full=True).manifest_json) > 200 * KiB


def _reindexed(data: bytes, incident_id: str) -> bytes:
    """``data`` rebuilt by the IncidentBuilder (a manifest change must keep the digest valid)."""
    from integrations.incident import Incident

    inc = Incident.from_bytes(data, verify=False)
    manifest = inc.manifest
    manifest.pop("integrity")
    return Incident.from_records(manifest, inc.records(copy=True)).to_bytes()


def test_a_manifest_too_large_for_full_is_a_typed_refusal_not_a_broken_incident(
        serve: Serve) -> None:
    """An incident stored under a larger max_manifest_bytes, served under a smaller response
    cap: BASIC and DownloadIncident still work, FULL says what to do instead."""
    roomy = {"max_manifest_bytes": 1300 * KiB, "max_incident_bytes": 4 * MiB}
    sc, addr = serve(limits=roomy)
    data = _reindexed(_with_manifest(build_incident("big"),
                                     lambda m: m.update(notes="n" * (1000 * KiB))), "big")
    with SidecarClient(addr) as c:
        c.upload("big", data, chunk_size=32 * KiB)
    sc.stop(grace=0.5)
    sc2, addr2 = serve(limits={"max_response_bytes": MiB, "max_incident_bytes": 4 * MiB})
    with SidecarClient(addr2) as c:
        assert c.get("big").id == "big"                                  # BASIC
        with pytest.raises(grpc.RpcError) as e:
            c.get("big", full=True)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "DownloadIncident" in (e.value.details() or "")
        assert _reason(e.value) == "response_too_large"
        listed = c.stub.ListIncidents(v1.ListIncidentsRequest(view=v1.INCIDENT_VIEW_FULL),
                                      timeout=10)
        assert [i.id for i in listed.incidents] == ["big"] and not listed.incidents[0].manifest_json
    assert sc2.stats()["rejected"] == {"response_too_large": 1}


@pytest.mark.parametrize(("params_json", "says"), [
    (json.dumps({"benign_paths": ["/etc/passwd"]}), "no option(s) 'benign_paths'"),
    (json.dumps({"benign_ids": ["x"], "incident_path": "/etc/passwd"}), "'incident_path'"),
    ("[" * 100_000, "params_json is not JSON"),
    ("[1, 2]", "must be a JSON object"),
], ids=["host_path", "resolved_key", "nested_100k", "not_object"])
def test_job_options_are_declared_never_host_paths(serve: Serve, params_json: str,
                                                   says: str) -> None:
    sc, addr = serve(modules={"cf": {"enabled": False}})
    with SidecarClient(addr) as c:
        c.upload("inc-1", build_incident("inc-1"))
        with pytest.raises(grpc.RpcError) as e:
            c.stub.RunAnalysis(v1.RunAnalysisRequest(incident_id="inc-1", kind="cca",
                                                     params_json=params_json), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (e.value.details() or "") and "root:" not in (e.value.details() or "")
    assert _reason(e.value) == "bad_params" and sc.stats()["rejected"] == {"bad_params": 1}
    assert sc.jobs.counts()["pending"] == 0
