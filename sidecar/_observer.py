"""The telemetry observer the sidecar core reports to: metric definitions, spans, a no-op default.

The core (ingest, store, job runner, job kinds) never imports OpenTelemetry or
prometheus-client. Each component declares its metrics as :class:`Metric` values next to the
code that observes them and reports through one small interface, :class:`Telemetry`:
``observe(metric, value, labels=..., traceparent=...)``, ``span(name, ...)`` and ``shutdown()``.
``sidecar.telemetry`` turns that into Prometheus series and OTel spans; :class:`NoopTelemetry` is
the default and :class:`CountingTelemetry` keeps in-process tallies (tests, ``Sidecar.stats()``).
Adding a metric is one declaration and one ``observe`` call, in the module that measures it.

Example::

    QUEUE_WAIT = histogram("job_queue_wait_seconds", "Submit to claim.", labels=("kind",),
                           buckets=(0.1, 1.0, 10.0, float("inf")))
    tel = CountingTelemetry()
    tel.observe(QUEUE_WAIT, 0.25, labels={"kind": "cf"})
    with tel.span("ingest", traceparent="00-…-01", attributes={"forensics.incident.id": "i"}):
        pass
    tel.values(QUEUE_WAIT, kind="cf")        # [0.25]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "CountingTelemetry",
    "Metric",
    "NoopTelemetry",
    "Telemetry",
    "as_telemetry",
    "counter",
    "fan_out",
    "gauge",
    "histogram",
    "incident_attributes",
]

MetricKind = Literal["counter", "gauge", "histogram"]


@dataclasses.dataclass(frozen=True)
class Metric:
    """One metric the core observes (exported as ``forensics_<name>``; counters get ``_total``).

    ``observe`` means: counter → add ``value``; gauge → set it; histogram → record it (with
    the request's trace id as exemplar when ``exemplar``). ``values`` bounds a label to known
    values: they are exported at zero from the start and any other value becomes ``"other"``.
    Labels are always bounded sets: never an incident id, a tenant or a site.
    """

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    values: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    exemplar: bool = False


def counter(name: str, help: str, *, labels: tuple[str, ...] = (),
            values: Mapping[str, tuple[str, ...]] | None = None) -> Metric:
    """A counter (``observe`` adds ``value``, default 1)."""
    return Metric(name, "counter", help, labels=labels, values=dict(values or {}))


def gauge(name: str, help: str, *, labels: tuple[str, ...] = (),
          values: Mapping[str, tuple[str, ...]] | None = None) -> Metric:
    """A gauge (``observe`` sets ``value``)."""
    return Metric(name, "gauge", help, labels=labels, values=dict(values or {}))


def histogram(name: str, help: str, *, buckets: tuple[float, ...], labels: tuple[str, ...] = (),
              exemplar: bool = False,
              values: Mapping[str, tuple[str, ...]] | None = None) -> Metric:
    """A histogram with ``buckets`` (``exemplar``: the trace id of each observation)."""
    return Metric(name, "histogram", help, labels=labels, buckets=buckets, exemplar=exemplar,
                  values=dict(values or {}))


@runtime_checkable
class Telemetry(Protocol):
    """What the sidecar core reports. Every method is thread-safe and never raises."""

    def observe(self, metric: Metric, value: float = 1.0, *,
                labels: Mapping[str, str] | None = None,
                traceparent: str | None = None) -> None:
        """Report ``value`` for ``metric``; ``traceparent`` (the request's W3C traceparent from
        the incident manifest) gives a histogram's exemplar."""
        ...

    def span(self, name: str, *, traceparent: str | None = None,
             attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
        """A span named ``name`` ("ingest", "index", "job.stats", ...) in a new trace *linked*
        to ``traceparent`` when given. The context value has ``set_attribute(key, value)``."""
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


class NullSpan:
    """A span that records nothing (what a span context yields when telemetry is off)."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass


class NoopTelemetry:
    """Telemetry that does nothing (the default when none is configured)."""

    def observe(self, metric: Metric, value: float = 1.0, *,
                labels: Mapping[str, str] | None = None,
                traceparent: str | None = None) -> None:
        pass

    @contextlib.contextmanager
    def span(self, name: str, *, traceparent: str | None = None,
             attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
        yield NullSpan()

    def shutdown(self) -> None:
        pass


class _DictSpan:
    def __init__(self, attrs: dict[str, Any], lock: threading.Lock) -> None:
        self._attrs, self._lock = attrs, lock

    def set_attribute(self, key: str, value: Any) -> None:
        with self._lock:
            self._attrs[key] = value


def _key(metric: Metric | str) -> str:
    return metric if isinstance(metric, str) else metric.name


class CountingTelemetry(NoopTelemetry):
    """In-process record of what was reported: every observation (in order) and every span
    (``spans``: names in order; ``span_attributes``: the last span of each name).

    Example::

        tel.total(INGEST_REJECTED, reason="bad_filter")   # counter: sum of observed values
        tel.latest(JOBS, "state")                         # gauge: {"pending": 0.0, ...}
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[str, float, dict[str, str]]] = []
        self.spans: list[str] = []
        self.span_attributes: dict[str, dict[str, Any]] = {}

    def observe(self, metric: Metric, value: float = 1.0, *,
                labels: Mapping[str, str] | None = None,
                traceparent: str | None = None) -> None:
        with self._lock:
            self._seen.append((metric.name, float(value), dict(labels or {})))

    def values(self, metric: Metric | str, **labels: str) -> list[float]:
        """Every value observed for ``metric`` whose labels include ``labels``, in order."""
        name = _key(metric)
        with self._lock:
            return [v for n, v, lab in self._seen
                    if n == name and all(lab.get(k) == x for k, x in labels.items())]

    def total(self, metric: Metric | str, **labels: str) -> float:
        """The sum of :meth:`values` (a counter's value)."""
        return sum(self.values(metric, **labels))

    def totals(self, metric: Metric | str, label: str) -> dict[str, float]:
        """The sum of the observed values per value of ``label``."""
        return self._by_label(metric, label, lambda old, value: old + value)

    def latest(self, metric: Metric | str, label: str) -> dict[str, float]:
        """The last observed value per value of ``label`` (a gauge's current values)."""
        return self._by_label(metric, label, lambda old, value: value)

    def _by_label(self, metric: Metric | str, label: str,
                  combine: Callable[[float, float], float]) -> dict[str, float]:
        out: dict[str, float] = {}
        name = _key(metric)
        with self._lock:
            for n, v, lab in self._seen:
                if n == name and label in lab:
                    out[lab[label]] = combine(out.get(lab[label], 0.0), v)
        return out

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

    def observe(self, metric: Metric, value: float = 1.0, *,
                labels: Mapping[str, str] | None = None,
                traceparent: str | None = None) -> None:
        for p in self._parts:
            p.observe(metric, value, labels=labels, traceparent=traceparent)

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
        for name in ("observe", "span", "shutdown"):
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
