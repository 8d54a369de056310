"""The telemetry hook protocol: no-op default, partial implementations, fan-out."""

from __future__ import annotations

from typing import Any

from sidecar._hooks import (
    REJECT_REASONS,
    CountingTelemetry,
    NoopTelemetry,
    Telemetry,
    as_telemetry,
    fan_out,
)


def test_noop_and_partial_implementations_are_full_telemetry() -> None:
    assert isinstance(as_telemetry(None), NoopTelemetry)

    class OnlyRejections:
        def __init__(self) -> None:
            self.reasons: list[str] = []

        def on_rejected(self, reason: str) -> None:
            self.reasons.append(reason)

    partial = OnlyRejections()
    tel = as_telemetry(partial)
    assert isinstance(tel, Telemetry)
    tel.on_rejected("bad_filter")
    tel.on_received(10)                         # missing → no-op
    tel.on_fix_set_size(1)
    tel.on_anomaly_p(0.5)                       # missing → no-op (objects written before it)
    with tel.span("ingest", traceparent=None) as span:
        span.set_attribute("k", 1)
    assert partial.reasons == ["bad_filter"]


def test_fan_out_reports_to_every_part() -> None:
    a, b = CountingTelemetry(), CountingTelemetry()
    tel = fan_out(a, None, b)
    tel.on_received(5)
    tel.on_rejected("sha256_mismatch")
    tel.on_job_finished("stats", "done", 0.1)
    tel.set_job_counts({"pending": 1})
    tel.on_anomaly_score(2.5, traceparent=None)
    tel.on_anomaly_p(0.01, traceparent=None)
    tel.on_fix_set_size(3, traceparent=None)
    with tel.span("job.stats", attributes={"x": 1}) as span:
        span.set_attribute("y", 2)
    for t in (a, b):
        assert (t.received, t.received_bytes, t.rejected["sha256_mismatch"]) == (1, 5, 1)
        assert t.jobs_finished[("stats", "done")] == 1 and t.job_counts == {"pending": 1}
        assert t.anomaly_scores == [2.5] and t.anomaly_ps == [0.01] and t.spans == ["job.stats"]
        assert t.fix_set_sizes == [3] and t.span_attributes["job.stats"] == {"x": 1, "y": 2}
    assert fan_out(a) is a and isinstance(fan_out(), NoopTelemetry)


def test_reject_reasons_are_bounded_label_values() -> None:
    assert len(REJECT_REASONS) == len(set(REJECT_REASONS))
    assert all(r.isidentifier() and r.islower() for r in REJECT_REASONS)
    _: Any = CountingTelemetry()
