"""SpoolDrainer on its own: order, retries, poison entries and accounting, with a plain upload
function in place of the gRPC client (the sidecar end to end is in test_exporters_sidecar)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc

from integrations.exporters._drain import SpoolDrainer
from integrations.exporters._retry import Backoff
from integrations.exporters._spool import DiskSpool
from integrations.exporters._tally import ExportTally
from integrations.exporters._upload import Attempt, Outcome


class Sidecar:
    """Answers uploads from a script: ``answers[id]`` is consumed per attempt, then ACKED."""

    def __init__(self, answers: dict[str, list[Attempt]]) -> None:
        self.answers = answers
        self.calls: list[str] = []
        self.acked: list[str] = []

    def upload(self, incident_id: str, data: bytes, traceparent: str) -> Attempt:
        self.calls.append(incident_id)
        script = self.answers.get(incident_id, [])
        if script:
            return script.pop(0)
        self.acked.append(incident_id)
        return Attempt(Outcome.ACKED)


def _drain(tmp_path: Path, sidecar: Sidecar, ids: list[str],
           responsive: Callable[[], bool] | None = None) -> tuple[DiskSpool, ExportTally]:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    for iid in ids:
        spool.put(iid, f"bytes of {iid}".encode())
    tally = ExportTally(spool=spool, metrics=None)
    drainer = SpoolDrainer(spool, upload=sidecar.upload, tally=tally, max_retries=2,
                           responsive=responsive,
                           backoff=Backoff(initial_s=0.001, max_s=0.002,
                                           on_sleep=lambda s: tally.count("backoff_s", s)))
    try:
        assert drainer.wait_empty(10.0)
    finally:
        drainer.stop(join_timeout_s=5)
    return spool, tally


def test_drains_in_order_deleting_only_after_the_ack(tmp_path):  # type: ignore[no-untyped-def]
    down = [Attempt(Outcome.UNREACHABLE, grpc.StatusCode.UNAVAILABLE)] * 3
    sidecar = Sidecar({"inc-0": list(down)})
    spool, tally = _drain(tmp_path, sidecar, ["inc-0", "inc-1", "inc-2"])
    assert sidecar.acked == ["inc-0", "inc-1", "inc-2"]  # the head waited; nothing overtook it
    assert sidecar.calls[:4] == ["inc-0"] * 4
    stats = tally.stats()
    assert stats["drained"] == 3 and stats["dropped"] == {} and stats["backoff_s"] > 0
    assert len(spool) == 0


def test_poison_and_rejected_entries_are_dropped_and_counted(tmp_path):  # type: ignore[no-untyped-def]
    busy = [Attempt(Outcome.UNREACHABLE, grpc.StatusCode.DEADLINE_EXCEEDED)] * 10
    rejected = [Attempt(Outcome.REJECTED, grpc.StatusCode.INVALID_ARGUMENT, "bad")]
    sidecar = Sidecar({"poison": list(busy), "bad": rejected})
    spool, tally = _drain(tmp_path, sidecar, ["poison", "bad", "ok"])
    assert sidecar.calls.count("poison") == 3   # max_retries=2: three attempts, then dropped
    assert sidecar.calls.count("bad") == 1      # never retried
    assert sidecar.acked == ["ok"]
    stats = tally.stats()
    assert stats["dropped"] == {"export_failed": 2} and stats["retries"] == 2
    assert stats["drained"] == 1 and len(spool) == 0


def test_a_sidecar_that_does_not_answer_is_waited_for_never_counted(tmp_path):  # type: ignore[no-untyped-def]
    """Upload deadlines while a health check also fails (a hung sidecar): the entry is kept and
    re-sent as long as it takes, like UNAVAILABLE; no retry counted against it, nothing dropped."""
    hung = [Attempt(Outcome.UNREACHABLE, grpc.StatusCode.DEADLINE_EXCEEDED)] * 6
    sidecar = Sidecar({"inc-0": list(hung)})
    probes: list[bool] = []

    def responsive() -> bool:
        probes.append(False)
        return False

    spool, tally = _drain(tmp_path, sidecar, ["inc-0", "inc-1"], responsive=responsive)
    assert sidecar.acked == ["inc-0", "inc-1"]   # 6 deadlines > max_retries=2, still delivered
    assert len(probes) == 6
    stats = tally.stats()
    assert stats["dropped"] == {} and stats["retries"] == 0 and stats["drained"] == 2
    assert len(spool) == 0


def test_an_answering_sidecar_counts_deadlines_against_the_entry(tmp_path):  # type: ignore[no-untyped-def]
    busy = [Attempt(Outcome.UNREACHABLE, grpc.StatusCode.DEADLINE_EXCEEDED)] * 10
    sidecar = Sidecar({"poison": list(busy)})
    spool, tally = _drain(tmp_path, sidecar, ["poison", "ok"], responsive=lambda: True)
    assert sidecar.calls.count("poison") == 3 and sidecar.acked == ["ok"]
    assert tally.stats()["dropped"] == {"export_failed": 1} and len(spool) == 0
