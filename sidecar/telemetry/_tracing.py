"""OpenTelemetry tracing for the sidecar: spans in a new trace, linked to the request's trace.

An incident arrives long after the request that produced it finished, so the sidecar's work
(``ingest``, ``index``, ``job.<kind>``) is *not* a child of the request span: each top-level
operation starts a NEW trace whose root span carries a span link to the request's W3C
``traceparent`` (read from the incident manifest, parsed by OpenTelemetry's own
``TraceContextTextMapPropagator``). Spans opened inside another sidecar span (``index`` inside
``ingest``) are its children. The tracer provider is private to the sidecar (never the global
one) and injectable, so tests pass an ``InMemorySpanExporter``.

Example::

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    mem = InMemorySpanExporter()
    tracing = Tracing(span_exporter=mem)
    with tracing.span("ingest", traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                      attributes={"incident.id": "inc-1"}):
        with tracing.span("index"):
            pass
    [s.name for s in mem.get_finished_spans()]   # ['index', 'ingest']
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["OTLPProtocol", "Tracing", "make_otlp_exporter", "parse_traceparent"]

_log = logging.getLogger(__name__)

OTLPProtocol = Literal["grpc", "http", "http/protobuf"]

_PROPAGATOR = TraceContextTextMapPropagator()
#: The sidecar span currently open in this thread/task (parent of nested sidecar spans).
_ACTIVE: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar(
    "forensics_sidecar_span", default=None)


def parse_traceparent(traceparent: str | None) -> trace.SpanContext | None:
    """The remote span context of a W3C ``traceparent`` header value; None if absent/invalid.

    Example::

        sc = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        format(sc.trace_id, "032x")   # '4bf92f3577b34da6a3ce929d0e0e4736'
    """
    if not traceparent or not isinstance(traceparent, str):
        return None
    ctx = _PROPAGATOR.extract({"traceparent": traceparent.strip()})
    sc = trace.get_current_span(ctx).get_span_context()
    return sc if sc.is_valid else None


def make_otlp_exporter(endpoint: str, *, protocol: OTLPProtocol = "grpc",
                       insecure: bool | None = None,
                       headers: Mapping[str, str] | None = None) -> SpanExporter:
    """An OTLP span exporter for ``endpoint`` over gRPC (default, e.g. ``localhost:4317``) or
    HTTP/protobuf (e.g. ``http://localhost:4318/v1/traces``)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        if insecure is None:
            insecure = not endpoint.startswith("https://")
        return GrpcExporter(endpoint=endpoint, insecure=insecure,
                            headers=dict(headers) if headers else None)
    if protocol in ("http", "http/protobuf"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        url = endpoint if "://" in endpoint else f"http://{endpoint}"
        if not url.rstrip("/").endswith("/v1/traces"):
            url = url.rstrip("/") + "/v1/traces"
        return HttpExporter(endpoint=url, headers=dict(headers) if headers else None)
    from integrations.errors import ConfigError

    raise ConfigError(f"telemetry.otlp_protocol must be 'grpc' or 'http/protobuf', got {protocol!r}")


def _attr_value(value: Any) -> Any:
    """A value OpenTelemetry accepts as an attribute (str/bool/int/float or a list of one)."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = list(value)
        if all(isinstance(v, str) for v in items):
            return items
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            return items
        return [str(v) for v in items]
    return str(value)


def _attrs(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    if not attributes:
        return {}
    return {str(k): _attr_value(v) for k, v in attributes.items() if v is not None}


class Tracing:
    """The sidecar's tracer: a private ``TracerProvider`` plus linked-trace span helpers.

    Args:
        tracer_provider: use this provider as is (its processors/exporters are the caller's).
        span_exporter: export finished spans here with a ``SimpleSpanProcessor`` (tests:
            ``InMemorySpanExporter``).
        otlp_endpoint / otlp_protocol / otlp_headers: also export over OTLP with a
            ``BatchSpanProcessor``. Off unless an endpoint is given.
        service_name: the ``service.name`` resource attribute.
        console: also print every finished span to stdout as JSON (OpenTelemetry's
            ``ConsoleSpanExporter``; local debugging, config ``telemetry.console_spans``).

    With none of them, spans are still created (so trace ids exist for exemplars) but go
    nowhere.
    """

    def __init__(self, *, tracer_provider: TracerProvider | None = None,
                 span_exporter: SpanExporter | None = None, otlp_endpoint: str | None = None,
                 otlp_protocol: OTLPProtocol = "grpc",
                 otlp_headers: Mapping[str, str] | None = None,
                 service_name: str = "forensics-sidecar", console: bool = False) -> None:
        self._owns_provider = tracer_provider is None
        self._closed = False
        if tracer_provider is None:
            tracer_provider = TracerProvider(
                resource=Resource.create({"service.name": service_name}))
        self.provider = tracer_provider
        if span_exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        if console:
            self.provider.add_span_processor(
                SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
        if otlp_endpoint:
            self.provider.add_span_processor(BatchSpanProcessor(
                make_otlp_exporter(otlp_endpoint, protocol=otlp_protocol, headers=otlp_headers)))
        self.tracer = self.provider.get_tracer("sidecar.telemetry")

    @contextlib.contextmanager
    def span(self, name: str, *, traceparent: str | None = None,
             attributes: Mapping[str, Any] | None = None) -> Iterator[trace.Span]:
        """Open span ``name``: a child of the enclosing sidecar span, else the root of a new
        trace. Either way it is linked to ``traceparent`` when that parses."""
        parent = _ACTIVE.get()
        if parent is not None and parent.is_recording():
            ctx = trace.set_span_in_context(parent, Context())
        else:
            ctx = Context()  # a NEW trace: never inherit an ambient (e.g. gRPC server) span
        links = []
        remote = parse_traceparent(traceparent)
        if remote is not None:
            links.append(trace.Link(remote, {"forensics.link": "request"}))
        attrs = _attrs(attributes)
        if traceparent and remote is None:
            attrs["forensics.traceparent_invalid"] = str(traceparent)[:128]
        with self.tracer.start_as_current_span(name, context=ctx, links=links,
                                               attributes=attrs,
                                               end_on_exit=True) as span:
            token = _ACTIVE.set(span)
            try:
                yield span
            finally:
                _ACTIVE.reset(token)

    @staticmethod
    def current_trace_id() -> str | None:
        """Hex trace id of the sidecar span open here, or None."""
        span = _ACTIVE.get()
        if span is None:
            return None
        sc = span.get_span_context()
        return format(sc.trace_id, "032x") if sc.is_valid else None

    def shutdown(self) -> None:
        """Flush and shut down the provider when this object created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_provider:
            try:
                self.provider.shutdown()
            except Exception as e:  # never raise from telemetry
                _log.warning("telemetry: tracer provider shutdown failed: %s", e)
        else:
            with contextlib.suppress(Exception):
                self.provider.force_flush()
