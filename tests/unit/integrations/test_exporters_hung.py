"""SidecarExporter against a sidecar that accepts the upload and never answers (a hung handler,
on a real loopback gRPC server), and the health probe that tells hung from answering.

The end-to-end version (a real sidecar process SIGSTOPped under a Recorder) is
``tests/integration/test_sidecar_hung.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from integrations.exporters import ExportResult, SidecarExporter
from integrations.exporters._upload import UploadClient
from tests.unit.integrations.test_exporters_sidecar import (
    free_port,
    make_incident,
    running_sidecar,
)


@pytest.fixture
def hung_sidecar() -> Iterator[tuple[int, threading.Event]]:
    """A gRPC server whose UploadIncident reads the whole stream, then hangs until released
    (then answers UNAVAILABLE); no health service."""
    release = threading.Event()

    def upload(request_iterator: Iterator[bytes], context: Any) -> bytes:
        for _ in request_iterator:
            pass
        release.wait(30)
        context.abort(grpc.StatusCode.UNAVAILABLE, "released")
        return b""

    handler = grpc.method_handlers_generic_handler("forensics.v1.IncidentService", {
        "UploadIncident": grpc.stream_unary_rpc_method_handler(upload)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=(handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, release
    finally:
        release.set()
        server.stop(grace=0)


def test_a_hung_upload_is_spooled_after_the_inline_deadline_not_retried(hung_sidecar, tmp_path):
    port, release = hung_sidecar
    ex = SidecarExporter(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool", deadline_s=30.0,
                         inline_deadline_s=0.3, max_retries=5, backoff_initial_s=0.01,
                         backoff_max_s=0.05)
    try:
        t0 = time.monotonic()
        assert ex.export(make_incident(0)) is ExportResult.SUCCESS
        first = time.monotonic() - t0
        assert 0.3 <= first < 5.0          # one inline attempt, not deadline_s x max_retries
        t1 = time.monotonic()
        for i in range(1, 20):             # behind the spooled one: no network at all
            assert ex.export(make_incident(i)) is ExportResult.SUCCESS
        assert time.monotonic() - t1 < 5.0
        st = ex.stats()
        assert st["spooled"] == 20 and st["acked"] == 0 and st["retries"] == 0
        assert st["dropped"] == {}
        assert ex.force_flush(timeout_s=0.2) is False   # the drain is stuck on the hung sidecar
    finally:
        release.set()   # the drain's upload is answered UNAVAILABLE: nothing sent, kept
        ex.shutdown(timeout_s=0.1)
    assert ex.stats()["dropped"] == {} and len(list((tmp_path / "spool").glob("*.arrow"))) == 20


def test_responsive_tells_an_answering_sidecar_from_a_silent_one(tmp_path):
    with running_sidecar(tmp_path / "data") as (_srv, port):
        client = UploadClient(f"127.0.0.1:{port}", token=None, tls=None, deadline_s=5.0,
                              reconnect_backoff_s=(0.1, 0.5))
        assert client.responsive(5.0) is True
        client.close()
    nobody = UploadClient(f"127.0.0.1:{free_port()}", token=None, tls=None, deadline_s=5.0,
                          reconnect_backoff_s=(0.1, 0.5))
    assert nobody.responsive(1.0) is False
    nobody.close()


def test_shutdown_cancels_a_hung_drain_upload_and_keeps_it_spooled(hung_sidecar, tmp_path):
    """Issue 14 item 5: shutdown(timeout_s) is bounded even while the drain's upload (deadline
    30 s) hangs; the entry it was sending stays in the spool for the next start."""
    port, _release = hung_sidecar
    ex = SidecarExporter(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool", deadline_s=30.0,
                         inline_deadline_s=0.2, backoff_initial_s=0.01, backoff_max_s=0.05)
    assert ex.export(make_incident(0)) is ExportResult.SUCCESS        # spooled
    assert ex.force_flush(timeout_s=0.5) is False                     # the drain hangs on it
    t0 = time.monotonic()
    ex.shutdown(timeout_s=0.5)
    took = time.monotonic() - t0
    assert took < 0.5 + 2.0, took               # not timeout_s + deadline_s (30 s)
    st = ex.stats()
    assert st["dropped"] == {} and st["spooled"] == 1 and st["drained"] == 0
    assert len(list((tmp_path / "spool").glob("*.arrow"))) == 1

