"""SpoolDrainer on its own: order, retries, poison entries and accounting, with a plain upload
function in place of the gRPC client (the sidecar end to end is in test_exporters_sidecar)."""

from __future__ import annotations

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


def _drain(tmp_path: Path, sidecar: Sidecar, ids: list[str]) -> tuple[DiskSpool, ExportTally]:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    for iid in ids:
        spool.put(iid, f"bytes of {iid}".encode())
    tally = ExportTally(spool=spool, metrics=None)
    drainer = SpoolDrainer(spool, upload=sidecar.upload, tally=tally, max_retries=2,
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
