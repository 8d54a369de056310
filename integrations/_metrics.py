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
import weakref
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


# registry -> namespace -> collectors (weak: a test's throw-away registry takes them with it)
_SHARED: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, ...]]] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def _make_collectors(reg: Any, namespace: str, counter: Any, gauge: Any) -> tuple[Any, ...]:
    try:
        dropped = counter("recorder_dropped_total", "Captured incidents dropped, by reason.",
                          ["reason"], namespace=namespace, registry=reg)
        for reason in DROP_REASONS:  # every series exists at 0: increase() sees the first drop
            dropped.labels(reason=reason)
        return (
            dropped,
            counter("recorder_captured_total", "Incidents captured (trigger fired).",
                    namespace=namespace, registry=reg),
            counter("recorder_exported_total", "Incidents acknowledged by the exporter.",
                    namespace=namespace, registry=reg),
            gauge("recorder_queue_depth", "Incidents waiting in the export queue.",
                  namespace=namespace, registry=reg),
            gauge("recorder_spool_bytes", "Bytes held in the local disk spool.",
                  namespace=namespace, registry=reg),
        )
    except ValueError as e:  # the names are taken in this registry by something else
        from .errors import ConfigError

        raise ConfigError(
            f"{e}; pass metrics_registry=prometheus_client.CollectorRegistry() to the "
            "Recorder, or free these metric names") from e


class RecorderMetrics:
    """Counters and gauges for one recorder, plus an in-process tally for ``Recorder.stats()``."""

    def __init__(self, *, registry: Any | None = None, namespace: str = "forensics") -> None:
        from prometheus_client import REGISTRY, Counter, Gauge

        reg = REGISTRY if registry is None else registry
        self._lock = threading.Lock()
        self._drops: _Counter[str] = _Counter()
        self._captured = 0
        self._exported = 0
        # Collectors are process-wide per registry: several recorders in one process (one per
        # model, say) add to the same series; the in-process tallies above stay per recorder.
        with _SHARED_LOCK:
            per_ns = _SHARED.setdefault(reg, {})
            shared = per_ns.get(namespace)
            if shared is None:
                shared = per_ns[namespace] = _make_collectors(reg, namespace, Counter, Gauge)
        (self.dropped_total, self.captured_total, self.exported_total, self.queue_depth,
         self.spool_bytes) = shared

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
