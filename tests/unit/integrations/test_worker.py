"""ExportWorker: given an exporter, metrics and a build function — no recorder involved."""

from __future__ import annotations

import threading

import torch
from prometheus_client import CollectorRegistry

from integrations import exporters
from integrations._metrics import RecorderMetrics
from integrations._worker import ExportWorker
from integrations.errors import IncidentTooLargeError
from integrations.incident import Incident, IncidentBuilder, new_manifest


def build(incident_id: str) -> Incident:
    """The build function of these tests: items are incident ids; some fail on purpose."""
    if incident_id == "too-big":
        raise IncidentTooLargeError("over the cap")
    if incident_id == "broken":
        raise ValueError("a bug while building")
    b = IncidentBuilder(manifest=new_manifest(id=incident_id))
    b.add(kind="activation", site="blocks.0.mlp", tensor=torch.zeros(1, 2))
    return Incident.from_bytes(b.to_bytes())


def _worker(exporter: exporters.Exporter, build_fn=build, max_queue: int = 8  # type: ignore[no-untyped-def]
            ) -> tuple[ExportWorker[str], RecorderMetrics]:
    metrics = RecorderMetrics(registry=CollectorRegistry())
    w: ExportWorker[str] = ExportWorker(exporter=exporter, metrics=metrics, build=build_fn,
                                        max_queue=max_queue)
    w.start()
    return w, metrics


def test_every_item_is_exported_or_dropped_by_reason() -> None:
    class Refusing(exporters.InMemoryExporter):
        def export(self, incident: Incident) -> exporters.ExportResult:
            if incident.id == "refused":
                return exporters.ExportResult.FAILURE
            return super().export(incident)

    ex = Refusing()
    w, metrics = _worker(ex)
    for iid in ("a", "too-big", "broken", "refused", "b"):
        assert w.submit(iid, iid) == iid
    assert w.flush(timeout_s=10)
    w.stop(timeout_s=10)
    assert [i.id for i in ex.incidents] == ["a", "b"]
    snap = metrics.snapshot()
    assert snap["exported"] == 2
    assert snap["dropped"] == {"too_large": 1, "capture_error": 1, "export_failed": 1}
    assert w.submit("late", "late") is None  # after stop: dropped as shutdown
    assert metrics.snapshot()["dropped"]["shutdown"] == 1


def test_full_queue_drops_and_stop_counts_what_is_left() -> None:
    started, gate = threading.Event(), threading.Event()

    def slow(incident_id: str) -> Incident:
        started.set()
        gate.wait(10)
        return build(incident_id)

    ex = exporters.InMemoryExporter()
    w, metrics = _worker(ex, slow, max_queue=1)
    try:
        assert w.submit("first", "first") == "first"
        assert started.wait(10)                        # the thread is building "first"
        assert w.submit("queued", "queued") == "queued"
        assert w.submit("no-room", "no-room") is None  # put_nowait on a full queue: never waits
        assert not w.flush(timeout_s=0.05)
        w.stop(timeout_s=0.05)                         # "queued" is still waiting
    finally:
        gate.set()
    assert w.flush(timeout_s=10)  # "first" finishes, into an exporter already shut down
    assert ex.incidents == []
    # 3 submitted = 0 exported + queue_full + shutdown + export_failed, each counted once
    assert metrics.snapshot()["dropped"] == {"queue_full": 1, "shutdown": 1, "export_failed": 1}
