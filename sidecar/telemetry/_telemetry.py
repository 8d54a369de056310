"""The real implementation of the sidecar's telemetry hooks: OpenTelemetry + Prometheus.

:class:`SidecarTelemetry` implements :class:`sidecar._observer.Telemetry`: the servicer, store,
job runner and job kinds call it; it turns the calls into spans (a new trace per incident/job,
linked to the request's traceparent) and Prometheus series (served on ``/metrics`` when a port
is given).
Every method is thread-safe and never raises into the core.

Example::

    from prometheus_client import CollectorRegistry
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    tel = SidecarTelemetry(registry=CollectorRegistry(), span_exporter=InMemorySpanExporter(),
                           metrics_port=0)
    server, port = create_server(config, port=0, telemetry=tel)   # the core calls it from here
    print(tel.metrics_url)                                         # http://127.0.0.1:<port>/metrics
    tel.shutdown()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from sidecar._observer import Metric, NoopTelemetry, NullSpan

from ._prometheus import MetricsHTTPServer, SidecarMetrics
from ._tracing import OTLPProtocol, Tracing, parse_traceparent

if TYPE_CHECKING:
    from sidecar._config import SidecarConfig

__all__ = ["SidecarTelemetry"]

_log = logging.getLogger(__name__)


class SidecarTelemetry(NoopTelemetry):
    """OpenTelemetry spans and Prometheus metrics for one sidecar.

    Args:
        registry: Prometheus registry (default: a new private one; pass
            ``prometheus_client.REGISTRY`` to share the process-global one).
        metrics_port: serve ``/metrics`` on this port (0 = any free port; None = no server).
        metrics_addr: address the metrics server binds (default loopback).
        tracer_provider / span_exporter / otlp_endpoint / otlp_protocol / otlp_headers /
            service_name: see :class:`~sidecar.telemetry.Tracing`. OTLP is off unless
            ``otlp_endpoint`` is set.
        console_spans: print every finished span to stdout as JSON (local debugging).
    """

    def __init__(self, *, registry: CollectorRegistry | None = None,
                 metrics_port: int | None = None, metrics_addr: str = "127.0.0.1",
                 tracer_provider: Any = None, span_exporter: Any = None,
                 otlp_endpoint: str | None = None, otlp_protocol: OTLPProtocol = "grpc",
                 otlp_headers: Mapping[str, str] | None = None,
                 service_name: str = "forensics-sidecar", console_spans: bool = False) -> None:
        self.metrics = SidecarMetrics(registry=registry)
        self.tracing = Tracing(tracer_provider=tracer_provider, span_exporter=span_exporter,
                               otlp_endpoint=otlp_endpoint, otlp_protocol=otlp_protocol,
                               otlp_headers=otlp_headers, service_name=service_name,
                               console=console_spans)
        self.http: MetricsHTTPServer | None = None
        if metrics_port is not None:
            self.http = MetricsHTTPServer(self.metrics.registry, port=metrics_port,
                                          addr=metrics_addr)

    @classmethod
    def from_config(cls, config: SidecarConfig, *, registry: CollectorRegistry | None = None,
                    span_exporter: Any = None, tracer_provider: Any = None,
                    metrics_port: int | None = None) -> SidecarTelemetry:
        """Telemetry as ``config.metrics`` / ``config.telemetry`` say: ``/metrics`` on
        ``metrics.address`` when ``metrics.enabled`` (``metrics_port`` overrides the port, 0 =
        any free one), OTLP export when ``telemetry.otlp_endpoint`` is set.

        Example::

            tel = SidecarTelemetry.from_config(load_config("configs/sidecar.yaml"))
            sidecar, port = create_server(cfg, telemetry=tel)
        """
        port: int | None = None
        addr = "127.0.0.1"
        if config.metrics.enabled:
            addr, port = config.metrics.bind
            port = port if metrics_port is None else metrics_port
        t = config.telemetry
        protocol: OTLPProtocol = "grpc" if t.otlp_protocol == "grpc" else "http/protobuf"
        return cls(registry=registry, metrics_port=port, metrics_addr=addr,
                   tracer_provider=tracer_provider, span_exporter=span_exporter,
                   otlp_endpoint=t.otlp_endpoint or None, otlp_protocol=protocol,
                   service_name=t.service_name, console_spans=t.console_spans)

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @property
    def metrics_url(self) -> str | None:
        """``http://addr:port/metrics`` when the HTTP server runs, else None."""
        return None if self.http is None else self.http.url

    # -- metrics ---------------------------------------------------------------------------

    def observe(self, metric: Metric, value: float = 1.0, *,
                labels: Mapping[str, str] | None = None,
                traceparent: str | None = None) -> None:
        """Report ``value`` for ``metric`` to Prometheus; a histogram declared with
        ``exemplar`` carries the trace id (see :meth:`_exemplar`)."""
        try:
            exemplar = self._exemplar(traceparent) if metric.exemplar else None
            self.metrics.observe(metric, value, labels=labels, exemplar=exemplar)
        except Exception as e:
            _log.warning("telemetry: observing %s failed: %s", metric.name, e)

    def _exemplar(self, traceparent: str | None) -> dict[str, str] | None:
        """Exemplar labels: the request's trace id (from ``traceparent``) — the trace an
        operator jumps to from a high score, and the one every sidecar trace links to; without
        a usable traceparent, the trace of the sidecar span open here (if any)."""
        sc = parse_traceparent(traceparent)
        tid = format(sc.trace_id, "032x") if sc is not None else self.tracing.current_trace_id()
        return None if tid is None else {"trace_id": tid}

    # -- spans -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, name: str, *, traceparent: str | None = None,
             attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
        """A span ``name`` (``ingest``, ``index``, ``job.<kind>``): a child of the enclosing
        sidecar span, else the root of a new trace linked to ``traceparent``."""
        try:
            cm = self.tracing.span(name, traceparent=traceparent, attributes=attributes)
            span = cm.__enter__()
        except Exception as e:  # telemetry must not break ingest
            _log.warning("telemetry: starting span %r failed: %s", name, e)
            yield NullSpan()
            return
        try:
            yield span
        except BaseException as exc:
            if not cm.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            cm.__exit__(None, None, None)

    # -- lifecycle ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the metrics server and flush/shut down the tracer provider. Idempotent."""
        if self.http is not None:
            self.http.close()
            self.http = None
        self.tracing.shutdown()

    def __enter__(self) -> SidecarTelemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

