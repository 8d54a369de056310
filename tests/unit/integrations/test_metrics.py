"""Recorder metrics: every drop reason is a series from the first scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from integrations._metrics import DROP_REASONS, RecorderMetrics


def test_every_drop_reason_is_exported_at_zero_before_the_first_drop() -> None:
    reg = CollectorRegistry()
    m = RecorderMetrics(registry=reg)
    text = generate_latest(reg).decode()
    for reason in DROP_REASONS:
        # Without the series, increase() over the first drop reads 0 and the alert misses it.
        assert f'forensics_recorder_dropped_total{{reason="{reason}"}} 0.0' in text
    m.dropped("too_large")
    assert 'forensics_recorder_dropped_total{reason="too_large"} 1.0' in generate_latest(
        reg).decode()
    assert m.snapshot()["dropped"] == {"too_large": 1}
