"""Recorder → SidecarExporter → real sidecar with real telemetry, end to end.

A tiny GPT-2 is served under the Recorder; the flagged request's incident travels over gRPC to an
in-process sidecar whose telemetry is :class:`sidecar.telemetry.SidecarTelemetry` (OTel
in-memory span exporter + a real ``/metrics`` HTTP server), then an analysis job runs on it.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from integrations import Recorder, exporters, triggers
from integrations.incident import Incident
from sidecar import JobKind, SidecarConfig, builtin_kinds, create_server
from sidecar.jobs._cf import ANOMALY_SCORE
from sidecar.telemetry import SidecarTelemetry

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def _score_job(ctx: Any) -> dict[str, Any]:
    """A job that measures something real from the stored incident (its mean |activation|)."""
    inc = ctx.open_incident()
    vals = [inc.tensor(s, step=0).abs().mean().item() for s in inc.sites()]
    return {"anomaly_score": float(sum(vals) / len(vals)), "n_sites": len(vals)}


def _observe_score(host: Any, job: Any, result: dict[str, Any]) -> None:
    """The kind reports its own number (exemplar: the incident's request trace)."""
    host.observe(ANOMALY_SCORE, result["anomaly_score"])


SCORE_KIND = JobKind("test_anomaly_score", run=_score_job, after=_observe_score)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _sidecar(data: Path, *, port: int = 0,
             telemetry: SidecarTelemetry | None = None) -> Iterator[tuple[Any, int]]:
    srv, bound = create_server(SidecarConfig.defaults(data_dir=str(data)), port=port,
                               telemetry=telemetry, kinds=(*builtin_kinds(), SCORE_KIND))
    srv.start()
    try:
        yield srv, bound
    finally:
        srv.stop(grace=0)


def _scrape_openmetrics(url: str) -> str:
    req = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


def _serve_flagged(rec: Recorder, model: torch.nn.Module, request_id: str) -> None:
    ids = torch.tensor([[5, 17, 42, 8]])  # [batch, pos]
    with rec.request(request_id=request_id, tenant="acme", traceparent=TRACEPARENT) as req:
        req.flag("prompt_injection")
        with torch.no_grad():
            model(input_ids=ids)


def test_recorded_incident_reaches_the_sidecar_with_linked_spans_and_metrics(tiny_gpt2,
                                                                             tmp_path):
    mem = InMemorySpanExporter()
    with SidecarTelemetry(registry=CollectorRegistry(), span_exporter=mem,
                          metrics_port=0) as tel, \
            _sidecar(tmp_path / "data", telemetry=tel) as (srv, port):
        ex = exporters.SidecarExporter(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool")
        with Recorder(tiny_gpt2, sites=["blocks.*.resid_post"], trigger=triggers.OnFlag(),
                      exporter=ex, metrics_registry=CollectorRegistry()) as rec:
            ex.bind_metrics(rec.metrics)
            _serve_flagged(rec, tiny_gpt2, "r-1")
            assert rec.force_flush(timeout_s=60)
            assert rec.stats()["exported"] == 1 and rec.stats()["dropped"] == {}
            assert ex.stats()["acked"] == 1

            (path,) = srv.store.incidents_dir.glob("*/*.arrow")   # <tenant dir>/<id>.arrow
            row = srv.store.get(path.stem)
            inc = Incident.open(srv.store.path(row.id))
            assert inc.manifest["request"]["traceparent"] == TRACEPARENT
            assert inc.sites() == [f"blocks.{i}.resid_post" for i in range(3)]
            assert tuple(inc.tensor("blocks.2.resid_post", step=0).shape) == (1, 4, 32)

            job = srv.jobs.submit(row.id, "test_anomaly_score", tenant="acme")
            done = srv.jobs.wait(job.id, timeout_s=60)
            assert done.state == "done"

            spans = {s.name: s for s in mem.get_finished_spans()}
            assert {"ingest", "index", "job.test_anomaly_score"} <= set(spans)
            ingest, index, jobspan = spans["ingest"], spans["index"], spans["job.test_anomaly_score"]
            assert ingest.parent is None and index.parent.span_id == ingest.context.span_id
            assert jobspan.parent is None and jobspan.context.trace_id != ingest.context.trace_id
            for s in (ingest, jobspan):  # new traces, each linked to the request's trace
                assert format(s.context.trace_id, "032x") != TRACE_ID
                assert [format(link.context.trace_id, "032x") for link in s.links] == [TRACE_ID]
            sites = [f"blocks.{i}.resid_post" for i in range(3)]
            for s in (ingest, index):   # sites are span attributes (never Prometheus labels)
                assert s.attributes["forensics.incident.id"] == row.id
                assert s.attributes["forensics.incident.tenant"] == "acme"
                assert s.attributes["forensics.incident.bytes"] == inc.nbytes
                assert s.attributes["forensics.incident.n_sites"] == 3
                assert list(s.attributes["forensics.incident.sites"]) == sites
            assert ingest.attributes["forensics.ingest.protocol"] == "crc32c"
            assert jobspan.attributes["forensics.job.kind"] == "test_anomaly_score"

            om = _scrape_openmetrics(tel.metrics_url)
            assert "forensics_incidents_received_total 1.0" in om
            assert f"forensics_ingest_bytes_total {float(inc.nbytes)}" in om
            # the measured score, with the request's trace id as exemplar
            assert done.result is not None
            score = done.result["anomaly_score"]
            assert f'# {{trace_id="{TRACE_ID}"}} {score}' in om
            assert "forensics_anomaly_score_count 1.0" in om
            assert 'forensics_job_duration_seconds_count{kind="test_anomaly_score"} 1.0' in om


def test_recorder_flush_waits_for_the_spool_to_drain(tiny_gpt2, tmp_path):
    port = _free_port()
    ex = exporters.SidecarExporter(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool",
                                   backoff_initial_s=0.01, backoff_max_s=0.1)
    with Recorder(tiny_gpt2, sites=["blocks.0.resid_post"], trigger=triggers.OnFlag(),
                  exporter=ex, metrics_registry=CollectorRegistry()) as rec:
        ex.bind_metrics(rec.metrics)
        for i in range(3):
            _serve_flagged(rec, tiny_gpt2, f"r-{i}")
        assert rec.force_flush(timeout_s=0.5) is False  # sidecar down: spooled, not delivered
        assert rec.stats()["exported"] == 3 and ex.stats()["spooled"] == 3
        assert rec.metrics.spool_bytes._value.get() > 0
        with _sidecar(tmp_path / "data", port=port) as (srv, _):
            assert rec.force_flush(timeout_s=30)
            ids = sorted(p.stem for p in srv.store.incidents_dir.glob("*/*.arrow"))
            assert len(ids) == 3
            reqs = sorted(Incident.open(srv.store.path(i)).manifest["request"]["id"]
                          for i in ids)
            assert reqs == ["r-0", "r-1", "r-2"]
            assert rec.metrics.spool_bytes._value.get() == 0


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_from_config_reads_the_sidecar_config(tmp_path, protocol):
    cfg = SidecarConfig.from_dict({
        "data_dir": str(tmp_path), "metrics": {"address": "127.0.0.1:0"},
        "telemetry": {"otlp_endpoint": "localhost:4317", "otlp_protocol": protocol}})
    tel = SidecarTelemetry.from_config(cfg, registry=CollectorRegistry())
    try:
        assert tel.metrics_url is not None and tel.metrics_url.startswith("http://127.0.0.1:")
        assert "forensics_jobs" in _scrape_openmetrics(tel.metrics_url)
    finally:
        tel.shutdown()
