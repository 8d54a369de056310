"""The telemetry hook protocol the sidecar core calls (spans, counters), with a no-op default.

The core (servicer, store, job runner) never imports OpenTelemetry or prometheus-client; it calls
a :class:`Telemetry` object. ``sidecar.telemetry`` provides the real one (OTel spans linked to the
request's traceparent, Prometheus ``/metrics``); :class:`NoopTelemetry` is the default and
:class:`CountingTelemetry` keeps plain in-process tallies (used by tests and ``Sidecar.stats()``).

Example::

    tel = CountingTelemetry()
    with tel.span("ingest", traceparent="00-…-01", attributes={"incident.id": "inc-1"}):
        tel.on_received(1234)
    tel.rejected["sha256_mismatch"]   # -> 0
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "JOB_STATES",
    "REJECT_REASONS",
    "CountingTelemetry",
    "NoopTelemetry",
    "Telemetry",
    "as_telemetry",
    "fan_out",
    "incident_attributes",
]

#: Every reason an upload or query can be rejected for (label values of
#: ``forensics_ingest_rejected_total{reason}``). Bounded: never an incident id or a site.
REJECT_REASONS = (
    "bad_framing",        # stream not header → chunks → trailer, or a missing/duplicate part
    "bad_id",             # incident id not [A-Za-z0-9][A-Za-z0-9._:-]{0,127}, or ≠ manifest id
    "chunk_too_large",    # one chunk over limits.max_chunk_bytes
    "too_large",          # declared or actual total over limits.max_incident_bytes
    "size_mismatch",      # bytes received ≠ header.total_size
    "sha256_mismatch",    # trailer sha256 ≠ sha256 of the bytes
    "invalid_incident",   # non-Arrow, truncated Arrow, wrong schema, bad manifest
    "already_exists",     # same id, different bytes
    "permission_denied",  # tenant in header ≠ token's tenant
    "unauthenticated",    # missing / unknown bearer token
    "bad_filter",         # ListIncidents/WatchIncidents filter, order_by or page_token invalid
    "deadline_exceeded",  # the client's deadline passed before the incident was durable
    "internal",           # store failure (disk full, index error); nothing acknowledged
)

#: Job states (label values of ``forensics_jobs{state}``).
JOB_STATES = ("pending", "running", "done", "failed")


@runtime_checkable
class Telemetry(Protocol):
    """What the sidecar core reports. All methods must be thread-safe and never raise."""

    def on_received(self, nbytes: int) -> None:
        """A new incident of ``nbytes`` was made durable and indexed (not called for retries)."""
        ...

    def on_rejected(self, reason: str) -> None:
        """An upload or query was rejected; ``reason`` is one of :data:`REJECT_REASONS`."""
        ...

    def on_job_finished(self, kind: str, state: str, seconds: float) -> None:
        """A job attempt of ``kind`` ended in ``state`` ("done" / "failed" / "pending" = retry)."""
        ...

    def set_job_counts(self, counts: Mapping[str, int]) -> None:
        """Current number of jobs per state (every state of :data:`JOB_STATES` present)."""
        ...

    def on_anomaly_score(self, score: float, *, traceparent: str | None = None) -> None:
        """An analysis produced an incident-level anomaly score (exemplar: the trace id)."""
        ...

    def on_anomaly_p(self, p: float, *, traceparent: str | None = None) -> None:
        """... and the incident's empirical p-value against the model's benign baseline."""
        ...

    def on_fix_set_size(self, size: int, *, traceparent: str | None = None) -> None:
        """A CCA search found a verified minimal fix set of ``size`` interventions (searches that
        found none are not observed: they have no size); exemplar: the trace id."""
        ...

    def span(self, name: str, *, traceparent: str | None = None,
             attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
        """A span named ``name`` ("ingest", "index", "job.stats", ...) in a new trace *linked*
        to ``traceparent`` (the request's W3C traceparent from the manifest) when given.

        The context value has ``set_attribute(key, value)``.
        """
        ...

    def shutdown(self) -> None:
        """Flush exporters and stop servers (e.g. the metrics HTTP server)."""
        ...


#: At most this many sites go into a span's ``forensics.incident.sites`` attribute.
MAX_SPAN_SITES = 256


def incident_attributes(row: Any) -> dict[str, Any]:
    """Span attributes describing a stored incident: id, tenant, size, model, trigger and its
    sites as a list (sites are span attributes, never Prometheus labels). ``row`` is an index
    row (``sidecar._store_index.IncidentRow``)."""
    try:
        sites = json.loads(row.manifest_json).get("sites") or []
    except (ValueError, AttributeError):
        sites = []
    sites = [str(s) for s in sites] if isinstance(sites, list) else []
    attrs: dict[str, Any] = {
        "forensics.incident.id": row.id, "forensics.incident.tenant": row.tenant,
        "forensics.incident.bytes": row.size_bytes, "forensics.incident.n_sites": row.n_sites,
        "forensics.incident.sites": sites[:MAX_SPAN_SITES],
        "forensics.model.name": row.model_name or "",
        "forensics.trigger.rule": row.trigger_rule or "",
        "forensics.trigger.reason": row.trigger_reason or "",
    }
    if len(sites) > MAX_SPAN_SITES:
        attrs["forensics.incident.sites_truncated"] = True
    return attrs


class _NullSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        pass


class _DictSpan:
    def __init__(self, attrs: dict[str, Any], lock: threading.Lock) -> None:
        self._attrs, self._lock = attrs, lock

    def set_attribute(self, key: str, value: Any) -> None:
        with self._lock:
            self._attrs[key] = value


class NoopTelemetry:
    """Telemetry that does nothing (the default when none is configured)."""

    def on_received(self, nbytes: int) -> None:
        pass

    def on_rejected(self, reason: str) -> None:
        pass

    def on_job_finished(self, kind: str, state: str, seconds: float) -> None:
        pass

    def set_job_counts(self, counts: Mapping[str, int]) -> None:
        pass

    def on_anomaly_score(self, score: float, *, traceparent: str | None = None) -> None:
        pass

    def on_anomaly_p(self, p: float, *, traceparent: str | None = None) -> None:
        pass

    def on_fix_set_size(self, size: int, *, traceparent: str | None = None) -> None:
        pass

    @contextlib.contextmanager
    def span(self, name: str, *, traceparent: str | None = None,
             attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
        yield _NullSpan()

    def shutdown(self) -> None:
        pass


class CountingTelemetry(NoopTelemetry):
    """In-process tallies of what was reported: ``received``, ``received_bytes``, ``rejected``
    (a Counter by reason), ``jobs_finished`` (Counter of (kind, state)), ``job_counts``,
    ``spans`` (names, in order)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = 0
        self.received_bytes = 0
        self.rejected: Counter[str] = Counter()
        self.jobs_finished: Counter[tuple[str, str]] = Counter()
        self.job_counts: dict[str, int] = {}
        self.anomaly_scores: list[float] = []
        self.anomaly_ps: list[float] = []
        self.fix_set_sizes: list[int] = []
        self.spans: list[str] = []
        self.span_attributes: dict[str, dict[str, Any]] = {}

    def on_received(self, nbytes: int) -> None:
        with self._lock:
            self.received += 1
            self.received_bytes += nbytes

    def on_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def on_job_finished(self, kind: str, state: str, seconds: float) -> None:
        with self._lock:
            self.jobs_finished[(kind, state)] += 1

    def set_job_counts(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            self.job_counts = dict(counts)

    def on_anomaly_score(self, score: float, *, traceparent: str | None = None) -> None:
        with self._lock:
            self.anomaly_scores.append(score)

    def on_anomaly_p(self, p: float, *, traceparent: str | None = None) -> None:
        with self._lock:
            self.anomaly_ps.append(p)

    def on_fix_set_size(self, size: int, *, traceparent: str | None = None) -> None:
        with self._lock:
            self.fix_set_sizes.append(int(size))

    @contextlib.contextmanager
    def span(self, name: str, *, traceparent: str | None = None,
             attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
        attrs: dict[str, Any] = dict(attributes or {})
        with self._lock:
            self.spans.append(name)
            self.span_attributes[name] = attrs   # the last span of each name
        yield _DictSpan(attrs, self._lock)


class _FanOut(NoopTelemetry):
    def __init__(self, parts: list[Telemetry]) -> None:
        self._parts = parts

    def on_received(self, nbytes: int) -> None:
        for p in self._parts:
            p.on_received(nbytes)

    def on_rejected(self, reason: str) -> None:
        for p in self._parts:
            p.on_rejected(reason)

    def on_job_finished(self, kind: str, state: str, seconds: float) -> None:
        for p in self._parts:
            p.on_job_finished(kind, state, seconds)

    def set_job_counts(self, counts: Mapping[str, int]) -> None:
        for p in self._parts:
            p.set_job_counts(counts)

    def on_anomaly_score(self, score: float, *, traceparent: str | None = None) -> None:
        for p in self._parts:
            p.on_anomaly_score(score, traceparent=traceparent)

    def on_anomaly_p(self, p: float, *, traceparent: str | None = None) -> None:
        for part in self._parts:
            part.on_anomaly_p(p, traceparent=traceparent)

    def on_fix_set_size(self, size: int, *, traceparent: str | None = None) -> None:
        for p in self._parts:
            p.on_fix_set_size(size, traceparent=traceparent)

    @contextlib.contextmanager
    def span(self, name: str, *, traceparent: str | None = None,
             attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
        with contextlib.ExitStack() as stack:
            spans = [stack.enter_context(p.span(name, traceparent=traceparent,
                                                attributes=attributes)) for p in self._parts]
            yield spans[0] if len(spans) == 1 else _MultiSpan(spans)

    def shutdown(self) -> None:
        for p in self._parts:
            p.shutdown()


class _MultiSpan:
    def __init__(self, spans: list[Any]) -> None:
        self._spans = spans

    def set_attribute(self, key: str, value: Any) -> None:
        for s in self._spans:
            s.set_attribute(key, value)


class _Adapted(NoopTelemetry):
    """Wraps an object implementing only part of :class:`Telemetry`; the rest are no-ops."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        for name in ("on_received", "on_rejected", "on_job_finished", "set_job_counts",
                     "on_anomaly_score", "on_anomaly_p", "on_fix_set_size", "span",
                     "shutdown"):
            fn = getattr(inner, name, None)
            if callable(fn):
                setattr(self, name, fn)


def as_telemetry(obj: Any | None) -> Telemetry:
    """``obj`` as a full :class:`Telemetry` (``None`` → :class:`NoopTelemetry`; missing methods
    of a partial implementation become no-ops)."""
    if obj is None:
        return NoopTelemetry()
    if isinstance(obj, NoopTelemetry):
        return obj
    return _Adapted(obj)


def fan_out(*parts: Telemetry | None) -> Telemetry:
    """One :class:`Telemetry` that reports to every non-None part, in order."""
    real = [as_telemetry(p) for p in parts if p is not None]
    if not real:
        return NoopTelemetry()
    return real[0] if len(real) == 1 else _FanOut(real)
