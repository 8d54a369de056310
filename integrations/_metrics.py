"""Prometheus metrics of the serving-side middleware (recorder, queue, exporters, spool).

One :class:`RecorderMetrics` per recorder; the registry is injectable so tests (and hosts with
their own registry) never touch the global one. Sites are never labels (cardinality).

Example::

    from prometheus_client import CollectorRegistry
    m = RecorderMetrics(registry=CollectorRegistry())
    m.dropped("queue_full")
    m.queue_depth.set(3)
"""

from __future__ import annotations

import threading
from collections import Counter as _Counter
from typing import Any

__all__ = ["DROP_REASONS", "RecorderMetrics"]

#: Every reason a captured incident can be dropped for (label values of
#: ``forensics_recorder_dropped_total``).
DROP_REASONS = (
    "queue_full",      # the bounded queue was full (put_nowait failed)
    "too_large",       # over recorder.max_bundle_size_mb
    "capture_error",   # a hook or the incident builder raised (never reaches the model call)
    "export_failed",   # the exporter gave up (non-retryable or retries exhausted, no spool)
    "spool_full",      # the local disk spool is at its byte bound
    "shutdown",        # still queued when shutdown's timeout expired
)


class RecorderMetrics:
    """Counters and gauges for one recorder, plus an in-process tally for ``Recorder.stats()``."""

    def __init__(self, *, registry: Any | None = None, namespace: str = "forensics") -> None:
        from prometheus_client import REGISTRY, Counter, Gauge

        reg = REGISTRY if registry is None else registry
        self._lock = threading.Lock()
        self._drops: _Counter[str] = _Counter()
        self._captured = 0
        self._exported = 0
        try:
            self.dropped_total = Counter(
                "recorder_dropped_total", "Captured incidents dropped, by reason.",
                ["reason"], namespace=namespace, registry=reg)
            self.captured_total = Counter(
                "recorder_captured_total", "Incidents captured (trigger fired).",
                namespace=namespace, registry=reg)
            self.exported_total = Counter(
                "recorder_exported_total", "Incidents acknowledged by the exporter.",
                namespace=namespace, registry=reg)
            self.queue_depth = Gauge(
                "recorder_queue_depth", "Incidents waiting in the export queue.",
                namespace=namespace, registry=reg)
            self.spool_bytes = Gauge(
                "recorder_spool_bytes", "Bytes held in the local disk spool.",
                namespace=namespace, registry=reg)
        except ValueError as e:  # duplicated timeseries in this registry
            from .errors import ConfigError

            raise ConfigError(
                f"{e}; a second Recorder on the same Prometheus registry: pass "
                "metrics_registry=prometheus_client.CollectorRegistry() to one of them") from e

    def dropped(self, reason: str, n: int = 1) -> None:
        """Count ``n`` dropped incidents for ``reason`` (one of :data:`DROP_REASONS`)."""
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; one of {DROP_REASONS}")
        with self._lock:
            self._drops[reason] += n
        self.dropped_total.labels(reason=reason).inc(n)

    def captured(self) -> None:
        with self._lock:
            self._captured += 1
        self.captured_total.inc()

    def exported(self) -> None:
        with self._lock:
            self._exported += 1
        self.exported_total.inc()

    def snapshot(self) -> dict[str, Any]:
        """Consistent copy of the in-process tallies: captured, exported, dropped by reason."""
        with self._lock:
            return {"captured": self._captured, "exported": self._exported,
                    "dropped": dict(self._drops)}
