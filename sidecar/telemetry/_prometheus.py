"""Prometheus instruments for the sidecar's :class:`~sidecar._observer.Metric` definitions, and
the HTTP ``/metrics`` endpoint that serves them.

All names start with ``forensics_``. :class:`SidecarMetrics` creates one instrument per metric
definition (by default every metric the sidecar declares, :func:`sidecar._metrics.sidecar_metrics`,
so every series exists from the first scrape; a metric first seen in ``observe`` is created
then). Labels are bounded sets; incident ids, tenants and sites are never labels. Exemplars
only show in the OpenMetrics exposition: the endpoint negotiates on ``Accept`` (a scraper sending
``application/openmetrics-text`` gets OpenMetrics, anyone else the classic text format).

Example::

    from prometheus_client import CollectorRegistry
    m = SidecarMetrics(registry=CollectorRegistry())
    m.observe(INCIDENTS_RECEIVED, 1.0)
    server = MetricsHTTPServer(m.registry, port=0)       # 127.0.0.1, a free port
    urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics").read()
    server.close()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from sidecar._observer import Metric

__all__ = ["MetricsHTTPServer", "SidecarMetrics"]

_log = logging.getLogger(__name__)


class SidecarMetrics:
    """The Prometheus instruments of ``metrics`` (default: every metric the sidecar declares),
    registered in ``registry`` (default: a new one); ``instruments`` maps a metric's name to
    its instrument."""

    def __init__(self, *, registry: CollectorRegistry | None = None,
                 metrics: Iterable[Metric] | None = None, namespace: str = "forensics") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.namespace = namespace
        self.instruments: dict[str, MetricWrapperBase] = {}
        self._lock = threading.Lock()
        if metrics is None:
            from sidecar._metrics import sidecar_metrics

            metrics = sidecar_metrics()
        for metric in metrics:
            self.instrument(metric)

    def instrument(self, metric: Metric) -> MetricWrapperBase:
        """The instrument of ``metric``, created on first use (bounded label values are
        exported at zero from the start, so ``rate()`` and alerts work at once)."""
        with self._lock:
            found = self.instruments.get(metric.name)
            if found is None:
                found = self.instruments[metric.name] = self._create(metric)
            return found

    def _create(self, metric: Metric) -> MetricWrapperBase:
        common: dict[str, Any] = {"namespace": self.namespace, "registry": self.registry}
        inst: MetricWrapperBase
        if metric.kind == "histogram":
            inst = Histogram(metric.name, metric.help, list(metric.labels),
                             buckets=metric.buckets or Histogram.DEFAULT_BUCKETS, **common)
        else:
            cls = Counter if metric.kind == "counter" else Gauge
            inst = cls(metric.name, metric.help, list(metric.labels), **common)
        if len(metric.labels) == 1 and metric.labels[0] in metric.values:
            for value in metric.values[metric.labels[0]]:
                inst.labels(value)
        return inst

    def observe(self, metric: Metric, value: float, *, labels: Mapping[str, str] | None = None,
                exemplar: Mapping[str, str] | None = None) -> None:
        """Add (counter, never negative), set (gauge) or record (histogram) ``value``."""
        inst = self.instrument(metric)
        if metric.labels:
            inst = inst.labels(**self.label_values(metric, labels or {}))
        if metric.kind == "counter":
            inst.inc(max(0.0, float(value)))  # type: ignore[attr-defined]
        elif metric.kind == "gauge":
            inst.set(float(value))  # type: ignore[attr-defined]
        else:
            inst.observe(float(value), exemplar=dict(exemplar) if exemplar else None)  # type: ignore[attr-defined]

    @staticmethod
    def label_values(metric: Metric, labels: Mapping[str, str]) -> dict[str, str]:
        """``labels`` for ``metric``'s label names; a value outside a bounded label's known
        values becomes ``"other"`` (bounded cardinality)."""
        out: dict[str, str] = {}
        for name in metric.labels:
            value = str(labels.get(name, ""))
            known = metric.values.get(name)
            out[name] = value if known is None or value in known else "other"
        return out


class MetricsHTTPServer:
    """``/metrics`` over HTTP for ``registry`` (prometheus_client's server, on its own thread).

    ``port=0`` binds a free port (read it back from :attr:`port`). Content negotiation between
    the classic text format and OpenMetrics (needed for exemplars) is prometheus_client's.
    """

    def __init__(self, registry: CollectorRegistry, *, port: int = 9464,
                 addr: str = "127.0.0.1") -> None:
        self._httpd, self._thread = start_http_server(port, addr=addr, registry=registry)
        self.addr = addr
        self.port: int = int(self._httpd.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        httpd: Any = self._httpd
        if httpd is None:
            return
        self._httpd = None  # type: ignore[assignment]
        try:
            httpd.shutdown()
            httpd.server_close()
        except Exception as e:  # never raise from telemetry
            _log.warning("telemetry: stopping the metrics server failed: %s", e)
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
