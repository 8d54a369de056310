"""The sidecar with ``store.uri: s3://bucket/prefix`` against an S3 API EMULATOR (moto's
``ThreadedMotoServer`` on 127.0.0.1 — not AWS S3: no real server can run here, DESIGN §12),
over real gRPC on port 0: upload, list, get, download byte-identical, an analysis job, delete,
reindex from the bucket into a fresh index, and the emulator stopped mid-upload (UNAVAILABLE
``store_unavailable``, nothing acknowledged) followed by recovery."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import grpc
import pytest

from integrations._crc32c import crc32c
from sidecar._client import SidecarClient, upload_requests
from sidecar._reject import INGEST_REJECTED
from sidecar._server import Sidecar
from sidecar.api import v1
from tests._s3 import S3Emulator, s3_emulator, store_config
from tests._waiting import jobs_idle, wait_for
from tests.integration.conftest import KiB, build_incident


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Emulator]:
    """An S3 API emulator (moto) with an empty bucket (:func:`tests._s3.s3_emulator`)."""
    with s3_emulator(monkeypatch) as emu:
        yield emu


def test_s3_emulator_upload_list_download_job_delete_reindex(
        s3: S3Emulator, serve: Callable[..., tuple[Sidecar, str]]) -> None:
    """S3 API emulator: the whole incident life cycle with the files in the bucket."""
    sc, addr = serve(store=store_config(s3))
    data = {i: build_incident(i, n_sites=3, seed=n) for n, i in enumerate(("inc-1", "inc-2"))}
    with SidecarClient(addr) as c:
        for incident_id, blob in data.items():
            r = c.upload(incident_id, blob, chunk_size=4 * KiB)
            assert r.created and r.crc32c == crc32c(blob)
        assert c.upload("inc-1", data["inc-1"]).created is False      # idempotent retry
        assert s3.keys("fleet/a") == [f"fleet/a/incidents/t-acme/{i}.{ext}"
                                      for i in ("inc-1", "inc-2") for ext in ("arrow", "json")]
        assert not list((sc.store.root / "incidents").glob("*/*.arrow"))  # none on local disk
        assert sc.store.verifier.wait_idle(30)
        assert sorted(i.id for i in c.list().incidents) == ["inc-1", "inc-2"]
        got = c.get("inc-2")
        assert (got.integrity, got.sha256, got.n_sites) == \
            ("verified", hashlib.sha256(data["inc-2"]).hexdigest(), 3)
        for incident_id, blob in data.items():
            assert c.download(incident_id) == blob                   # byte-identical
        job = c.run_analysis("inc-1", "stats")
        done = wait_for(lambda: c.get_analysis(job.analysis_id).state == v1.JOB_STATE_DONE
                        and c.get_analysis(job.analysis_id), 60, "the stats job")
        assert "blocks.2.resid_post" in done.result_json
        c.delete("inc-2")
        assert s3.keys("fleet/a") == ["fleet/a/incidents/t-acme/inc-1.arrow",
                                      "fleet/a/incidents/t-acme/inc-1.json"]
        with pytest.raises(grpc.RpcError) as e:
            c.download("inc-2")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    wait_for(lambda: jobs_idle(sc), 30, "jobs")
    before = sc.store.get("inc-1", tenant="acme")
    with s3.fs().open_output_stream(f"{s3.bucket}/fleet/a/incidents/t-acme/junk.arrow") as f:
        f.write(b"not an incident")                                   # written behind our back
    fresh, fresh_addr = serve(store=store_config(s3), data_dir=str(sc.store.root.parent / "b"))
    report = fresh.store.last_recovery                                # listed from the bucket
    assert (report.indexed, report.quarantined) == (1, ["t-acme/junk"])
    assert s3.keys("fleet/a/quarantine") == ["fleet/a/quarantine/t-acme/junk.arrow"]
    again = fresh.store.get("inc-1", tenant="acme")
    assert before is not None and again is not None
    assert (again.sha256, again.received_at, again.integrity) == \
        (before.sha256, before.received_at, "verified")
    with SidecarClient(fresh_addr) as c:
        assert c.download("inc-1") == data["inc-1"]


def test_s3_emulator_stopped_mid_upload_is_unavailable_then_recovers(
        s3: S3Emulator, serve: Callable[..., tuple[Sidecar, str]]) -> None:
    """S3 API emulator stopped while an upload streams in: the object write fails, the call is
    UNAVAILABLE ``store_unavailable`` (counted), nothing is indexed or acknowledged; once the
    emulator is back the retried upload is stored and a fresh index rebuilt from the bucket
    holds exactly the acknowledged incidents."""
    sc, addr = serve(store=store_config(s3))
    first, second = build_incident("inc-1"), build_incident("inc-2", n_sites=4)

    def stop_midway() -> Iterator[v1.UploadIncidentRequest]:
        for n, msg in enumerate(upload_requests("inc-2", second, chunk_size=2 * KiB)):
            if n == 2:          # header and one chunk sent: the emulator goes away
                s3.stop()
            yield msg

    with SidecarClient(addr) as c:
        assert c.upload("inc-1", first).created
        with pytest.raises(grpc.RpcError) as e:
            c.stub.UploadIncident(stop_midway(), timeout=60)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(e.value.trailing_metadata() or ())["forensics-reject-reason"] == \
            "store_unavailable"
        assert sc.counters.totals(INGEST_REJECTED, "reason") == {"store_unavailable": 1}
        assert sc.store.get("inc-2", tenant="acme") is None          # nothing acknowledged
        assert [i.id for i in c.list().incidents] == ["inc-1"]
        assert not list((sc.store.root / "spool").iterdir())         # no temp file left
        for call in (lambda: c.download("inc-1"), lambda: c.delete("inc-1")):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert (e.value.code(), dict(e.value.trailing_metadata() or ())[
                "forensics-reject-reason"]) == (grpc.StatusCode.UNAVAILABLE, "store_unavailable")
        assert sc.counters.totals(INGEST_REJECTED, "reason") == {"store_unavailable": 3}
        s3.start()
        assert s3.keys("fleet/a") == ["fleet/a/incidents/t-acme/inc-1.arrow",
                                      "fleet/a/incidents/t-acme/inc-1.json"]
        assert c.upload("inc-2", second).created                      # the client's retry
        assert c.download("inc-2") == second
    fresh, _ = serve(store=store_config(s3), data_dir=str(sc.store.root.parent / "b"))
    assert sorted(fresh.store.index.incident_ids()) == ["inc-1", "inc-2"]
    assert fresh.store.last_recovery.quarantined == []


def test_s3_emulator_post_ack_check_quarantines_in_the_bucket(
        s3: S3Emulator, serve: Callable[..., tuple[Sidecar, str]]) -> None:
    """S3 API emulator: an acknowledged upload whose rows do not match its content digest is
    moved to ``<uri>/quarantine/<tenant dir>/`` with a reason object, its receipt and row
    removed, and counted."""
    from integrations.incident import Incident
    from sidecar._store_verify import INCIDENTS_QUARANTINED

    sc, addr = serve(store=store_config(s3))
    good = build_incident("inc-1", n_sites=3)
    bad = bytearray(good)
    bad[len(good) - 100] ^= 0x40            # inside the last tensor: structure still valid
    digest = Incident.from_bytes(good).manifest["integrity"]["sha256"]
    with SidecarClient(addr) as c:
        assert c.upload("inc-1", bytes(bad), content_sha256=digest).created   # acknowledged
    assert sc.store.verifier.wait_idle(30) and sc.store.get("inc-1", tenant="acme") is None
    assert s3.keys("fleet/a") == ["fleet/a/quarantine/t-acme/inc-1.arrow",
                                  "fleet/a/quarantine/t-acme/inc-1.reason.json"]
    assert sc.counters.totals(INCIDENTS_QUARANTINED, "reason") == {"content_digest_mismatch": 1}
    assert not list((sc.store.root / "cache").glob("*/inc-1.arrow"))
