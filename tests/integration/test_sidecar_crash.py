"""Issue 4 bar: SIGKILL the sidecar mid-stream, restart it, and prove nothing was lost silently.

The sidecar runs as a real subprocess (``python -m model_forensics sidecar serve``). 200 small
incidents are streamed through a SidecarExporter with a (deliberately small) disk spool; the
sidecar is SIGKILLed while uploads are in flight and restarted on the same data directory. Then:

* every incident acknowledged before the kill is on disk and readable at once (ack = durable);
* every other incident was re-sent from the spool (present after the restart) or counted as
  dropped with its reason; captured = present + dropped-and-counted, nothing else.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from integrations._metrics import RecorderMetrics
from integrations.exporters import ExportResult, SidecarExporter
from integrations.incident import Incident, IncidentBuilder, new_manifest
from sidecar.api import v1
from tests.integration.conftest import SidecarProcess, free_port

N = 200
KILL_AFTER = 100
KILL_RACE = 10   # exports that race the SIGKILL; the other 90 (> the spool's 40) find it dead


def _incident(i: int) -> Incident:
    m = new_manifest(id=f"crash-{i:03d}",
                     model={"name": "tiny", "revision": None, "fingerprint": "cd" * 32},
                     request={"id": f"r-{i}", "tenant": "acme", "traceparent": None},
                     trigger={"rule": "OnFlag", "reason": "crash-test", "step": 0},
                     runtime={"python": "3.11"})
    b = IncidentBuilder(manifest=m)
    b.add(kind="activation", site="blocks.0.resid_post", module_path="h.0", step=0,
          tensor=torch.full((1, 64), float(i)))  # [batch, d_model]
    return Incident.from_bytes(b.to_bytes())


@dataclasses.dataclass
class _Outcome:
    acked: list[str] = dataclasses.field(default_factory=list)    # acknowledged in export()
    spooled: list[str] = dataclasses.field(default_factory=list)  # SUCCESS via the spool
    failed: list[str] = dataclasses.field(default_factory=list)   # FAILURE (counted drops)


def _export_killing_midway(ex: SidecarExporter, incidents: list[Incident],
                           sidecar: SidecarProcess) -> _Outcome:
    """Export every incident; SIGKILL lands while the uploads after ``KILL_AFTER`` are in
    flight, and from ``KILL_AFTER + KILL_RACE`` on the sidecar is dead, whatever the timing:
    the spool fills, then drops are counted."""
    assert sidecar.proc is not None
    out = _Outcome()
    killer = threading.Timer(0.003, sidecar.proc.send_signal, args=(signal.SIGKILL,))
    try:
        for i, inc in enumerate(incidents):
            if i == KILL_AFTER:
                killer.start()
            if i == KILL_AFTER + KILL_RACE:
                killer.join()
                assert sidecar.proc.wait(timeout=10) == -signal.SIGKILL
            before = ex.stats()["acked"]
            result = ex.export(inc)
            if result is ExportResult.FAILURE:
                out.failed.append(inc.id)
            elif ex.stats()["acked"] == before + 1:
                out.acked.append(inc.id)
            else:
                out.spooled.append(inc.id)
    finally:
        killer.cancel()
    return out


def _listed(port: int) -> set[str]:
    """What the restarted sidecar serves (it indexed every incident file, including ones
    written just before the kill whose index row or ack never happened)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        page = v1.IncidentServiceStub(ch).ListIncidents(
            v1.ListIncidentsRequest(page_size=1000), timeout=30)
    listed = {i.id for i in page.incidents}
    assert page.total_size == len(listed)
    return listed


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_loses_nothing_silently(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"data_dir: {data}\ngrpc: {{address: '127.0.0.1:{port}'}}\n"
                      "metrics: {enabled: false}\n")
    incidents = [_incident(i) for i in range(N)]
    metrics = RecorderMetrics(registry=CollectorRegistry())
    # The spool holds 40 incidents: the 90 exported while the sidecar is dead overflow it,
    # so both branches (re-sent from the spool / counted as dropped) are exercised.
    ex = SidecarExporter(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool",
                         spool_max_bytes=40 * incidents[0].nbytes, deadline_s=10,
                         backoff_initial_s=0.02, backoff_max_s=0.3, metrics=metrics)
    try:
        with SidecarProcess(config, tmp_path / "sidecar.log") as sidecar:
            out = _export_killing_midway(ex, incidents, sidecar)
            # Ack = durable: everything acknowledged before the kill is on disk, readable.
            assert len(out.acked) >= KILL_AFTER
            for iid in out.acked:
                (stored,) = (data / "incidents").glob(f"*/{iid}.arrow")   # <tenant dir>/
                assert Incident.open(stored).id == iid
            assert out.spooled and out.failed, (len(out.acked), len(out.spooled),
                                                len(out.failed))
            assert ex.force_flush(timeout_s=0.2) is False  # the sidecar is dead
            sidecar.start()                                # same data dir, same port
            assert ex.force_flush(timeout_s=60), ex.stats()
            listed = _listed(port)
    finally:
        ex.shutdown(timeout_s=5)
    on_disk = _check_nothing_lost_silently(ex, metrics, out, incidents, tmp_path)
    assert listed == on_disk


def _check_nothing_lost_silently(ex: SidecarExporter, metrics: RecorderMetrics, out: _Outcome,
                                 incidents: list[Incident], tmp_path: Path) -> set[str]:
    """Every incident is present and intact, or counted as dropped; returns what is on disk."""
    stats = ex.stats()
    drops = metrics.snapshot()["dropped"]
    assert sum(drops.values()) == len(out.failed) == sum(stats["dropped"].values())
    assert set(drops) <= {"spool_full", "export_failed"}
    assert stats["drained"] == len(out.spooled)
    assert len(out.acked) + len(out.spooled) + len(out.failed) == N
    files = {p.stem: p for p in (tmp_path / "data" / "incidents").glob("*/*.arrow")}
    on_disk = set(files)
    assert on_disk == set(out.acked) | set(out.spooled)
    assert not on_disk & set(out.failed)
    for inc in incidents:
        if inc.id in on_disk:
            stored = Incident.open(files[inc.id])
            assert stored.to_bytes() == inc.to_bytes()
    assert not list((tmp_path / "spool").glob("*.arrow"))
    print(f"acked={len(out.acked)} spooled={len(out.spooled)} dropped={drops} "
          f"drained={stats['drained']} retries={stats['retries']}")
    return on_disk
