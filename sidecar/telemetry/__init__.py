"""Sidecar telemetry: OpenTelemetry spans linked to the request trace, Prometheus ``/metrics``.

:class:`SidecarTelemetry` is the real implementation of the core's hook protocol
(:class:`sidecar._hooks.Telemetry`). Spans ``ingest``, ``index`` and ``job.<kind>`` start a new
trace linked (span link) to the request's W3C traceparent from the incident manifest; OTLP export
(gRPC or HTTP) is off unless an endpoint is configured. Prometheus series (all ``forensics_``):
``incidents_received_total``, ``ingest_rejected_total{reason}``, ``ingest_bytes_total``,
``jobs{state}``, ``jobs_finished_total{kind,state}``, ``job_duration_seconds{kind}``,
``anomaly_score`` and ``anomaly_p`` (trace-id exemplars, OpenMetrics exposition) and ``fix_set_size``.

Example::

    from sidecar.telemetry import SidecarTelemetry
    tel = SidecarTelemetry(metrics_port=9464, otlp_endpoint="localhost:4317")
    with tel.span("ingest", traceparent=manifest["request"]["traceparent"],
                  attributes={"forensics.incident.id": "inc-1"}):
        tel.on_received(12345)
    tel.shutdown()
"""

from ._prometheus import (
    ANOMALY_P_BUCKETS,
    ANOMALY_SCORE_BUCKETS,
    FIX_SET_SIZE_BUCKETS,
    JOB_DURATION_BUCKETS,
    MetricsHTTPServer,
    SidecarMetrics,
)
from ._telemetry import SidecarTelemetry
from ._tracing import OTLPProtocol, Tracing, make_otlp_exporter, parse_traceparent

__all__ = [
    "ANOMALY_P_BUCKETS",
    "ANOMALY_SCORE_BUCKETS",
    "FIX_SET_SIZE_BUCKETS",
    "JOB_DURATION_BUCKETS",
    "MetricsHTTPServer",
    "OTLPProtocol",
    "SidecarMetrics",
    "SidecarTelemetry",
    "Tracing",
    "make_otlp_exporter",
    "parse_traceparent",
]
