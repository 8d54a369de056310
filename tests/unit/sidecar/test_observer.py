"""The telemetry observer interface: no-op default, partial implementations, fan-out, tallies."""

from __future__ import annotations

from typing import Any

from sidecar._observer import (
    CountingTelemetry,
    Metric,
    NoopTelemetry,
    Telemetry,
    as_telemetry,
    counter,
    fan_out,
    gauge,
    histogram,
)
from sidecar._reject import INGEST_REJECTED, REJECT_REASONS

RECEIVED = counter("received", "test counter")
REJECTED = counter("rejected", "test counter by reason", labels=("reason",))
FINISHED = counter("finished", "test counter by kind and state", labels=("kind", "state"))
COUNTS = gauge("counts", "test gauge by state", labels=("state",))
SCORE = histogram("score", "test histogram", buckets=(1.0, float("inf")), exemplar=True)


def test_noop_and_partial_implementations_are_full_telemetry() -> None:
    assert isinstance(as_telemetry(None), NoopTelemetry)

    class OnlyObserve:
        def __init__(self) -> None:
            self.seen: list[tuple[str, float]] = []

        def observe(self, metric: Metric, value: float = 1.0, **_: Any) -> None:
            self.seen.append((metric.name, value))

    partial = OnlyObserve()
    tel = as_telemetry(partial)
    assert isinstance(tel, Telemetry)
    tel.observe(REJECTED, labels={"reason": "bad_filter"})
    with tel.span("ingest", traceparent=None) as span:   # missing → no-op
        span.set_attribute("k", 1)
    tel.shutdown()                                        # missing → no-op
    assert partial.seen == [("rejected", 1.0)]

    class OnlySpans:   # written before observe existed: observations are dropped, not errors
        def span(self, name: str, **_: Any) -> Any:
            return NoopTelemetry().span(name)

    as_telemetry(OnlySpans()).observe(SCORE, 0.5, traceparent=None)


def test_fan_out_reports_to_every_part() -> None:
    a, b = CountingTelemetry(), CountingTelemetry()
    tel = fan_out(a, None, b)
    tel.observe(RECEIVED, 5)
    tel.observe(REJECTED, labels={"reason": "sha256_mismatch"})
    tel.observe(FINISHED, labels={"kind": "stats", "state": "done"})
    tel.observe(COUNTS, 1, labels={"state": "pending"})
    tel.observe(SCORE, 2.5, traceparent=None)
    with tel.span("job.stats", attributes={"x": 1}) as span:
        span.set_attribute("y", 2)
    for t in (a, b):
        assert (t.total(RECEIVED), t.total(REJECTED, reason="sha256_mismatch")) == (5, 1)
        assert t.total(FINISHED, kind="stats", state="done") == 1
        assert t.latest(COUNTS, "state") == {"pending": 1}
        assert t.values(SCORE) == [2.5] and t.spans == ["job.stats"]
        assert t.span_attributes["job.stats"] == {"x": 1, "y": 2}
    assert fan_out(a) is a and isinstance(fan_out(), NoopTelemetry)


def test_counting_tallies_by_label() -> None:
    t = CountingTelemetry()
    for reason in ("bad_id", "bad_id", "internal"):
        t.observe(REJECTED, labels={"reason": reason})
    t.observe(COUNTS, 3, labels={"state": "pending"})
    t.observe(COUNTS, 0, labels={"state": "pending"})
    assert t.totals(REJECTED, "reason") == {"bad_id": 2, "internal": 1}
    assert t.values("rejected", reason="internal") == [1.0]
    assert t.latest(COUNTS, "state") == {"pending": 0}
    assert t.total(SCORE) == 0 and t.values(SCORE) == []


def test_reject_reasons_are_bounded_label_values() -> None:
    assert len(REJECT_REASONS) == len(set(REJECT_REASONS))
    assert all(r.isidentifier() and r.islower() for r in REJECT_REASONS)
    assert INGEST_REJECTED.values == {"reason": REJECT_REASONS}
