"""Sidecar telemetry: OpenTelemetry spans linked to the request trace, Prometheus ``/metrics``.

:class:`SidecarTelemetry` is the real implementation of the core's observer interface
(:class:`sidecar._observer.Telemetry`). Spans ``ingest``, ``index`` and ``job.<kind>`` start a
new trace linked (span link) to the request's W3C traceparent from the incident manifest; OTLP
export (gRPC or HTTP) is off unless an endpoint is configured. Every metric the sidecar declares
(:func:`sidecar_metrics`, all ``forensics_``) becomes a Prometheus series; histograms declared
with ``exemplar`` carry the trace id (OpenMetrics exposition).

Example::

    from sidecar.telemetry import SidecarTelemetry
    tel = SidecarTelemetry(metrics_port=9464, otlp_endpoint="localhost:4317")
    with tel.span("ingest", traceparent=manifest["request"]["traceparent"],
                  attributes={"forensics.incident.id": "inc-1"}):
        tel.observe(INCIDENTS_RECEIVED)
    tel.shutdown()
"""

from sidecar._metrics import metric, sidecar_metrics

from ._prometheus import MetricsHTTPServer, SidecarMetrics
from ._telemetry import SidecarTelemetry
from ._tracing import OTLPProtocol, Tracing, make_otlp_exporter, parse_traceparent

__all__ = [
    "MetricsHTTPServer",
    "OTLPProtocol",
    "SidecarMetrics",
    "SidecarTelemetry",
    "Tracing",
    "make_otlp_exporter",
    "metric",
    "parse_traceparent",
    "sidecar_metrics",
]
