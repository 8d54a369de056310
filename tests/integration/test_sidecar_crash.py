"""Issue 4 bar: SIGKILL the sidecar mid-stream, restart it, and prove nothing was lost silently.

The sidecar runs as a real subprocess (``python -m model_forensics sidecar serve``). 200 small
incidents are streamed through a SidecarExporter with a (deliberately small) disk spool; the
sidecar is SIGKILLed while uploads are in flight and restarted on the same data directory. Then:

* every incident acknowledged before the kill is on disk and readable at once (ack = durable);
* every other incident was re-sent from the spool (present after the restart) or counted as
  dropped with its reason; captured = present + dropped-and-counted, nothing else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from integrations._metrics import RecorderMetrics
from integrations.exporters import ExportResult, SidecarExporter
from integrations.incident import Incident, IncidentBuilder, new_manifest
from sidecar.api import v1

REPO = Path(__file__).resolve().parents[2]
N = 200
KILL_AFTER = 100


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_sidecar(config: Path, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "model_forensics", "sidecar", "serve",
                             "--config", str(config), "--log-level", "WARNING"],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "listening on" in log.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"sidecar exited early:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"sidecar did not start:\n{log.read_text(errors='replace')}")


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_loses_nothing_silently(tmp_path):
    port = _free_port()
    data = tmp_path / "data"
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"data_dir: {data}\ngrpc: {{address: '127.0.0.1:{port}'}}\n"
                      "metrics: {enabled: false}\n")
    log = tmp_path / "sidecar.log"
    incidents = [_incident(i) for i in range(N)]
    size = incidents[0].nbytes
    metrics = RecorderMetrics(registry=CollectorRegistry())
    # The spool holds 40 incidents: the ~100 exported while the sidecar is dead overflow it,
    # so both branches (re-sent from the spool / counted as dropped) are exercised.
    ex = SidecarExporter(f"127.0.0.1:{port}", spool_dir=tmp_path / "spool",
                         spool_max_bytes=40 * size, deadline_s=10, backoff_initial_s=0.02,
                         backoff_max_s=0.3, metrics=metrics)

    proc = _start_sidecar(config, log)
    acked: list[str] = []      # acknowledged by the sidecar inside export()
    spooled: list[str] = []    # SUCCESS via the spool
    failed: list[str] = []     # FAILURE (must all be counted drops)
    killer: threading.Timer | None = None
    try:
        for i, inc in enumerate(incidents):
            if i == KILL_AFTER:  # SIGKILL lands while the next uploads are in flight
                killer = threading.Timer(0.003, proc.send_signal, args=(signal.SIGKILL,))
                killer.start()
            before = ex.stats()["acked"]
            result = ex.export(inc)
            if result is ExportResult.FAILURE:
                failed.append(inc.id)
            elif ex.stats()["acked"] == before + 1:
                acked.append(inc.id)
            else:
                spooled.append(inc.id)
        assert killer is not None
        killer.join()
        assert proc.wait(timeout=10) == -signal.SIGKILL

        # Ack = durable: everything acknowledged before the kill is already on disk, readable.
        assert len(acked) >= KILL_AFTER
        for iid in acked:
            got = Incident.open(data / "incidents" / f"{iid}.arrow")
            assert got.id == iid
        assert spooled and failed, (len(acked), len(spooled), len(failed))
        assert ex.force_flush(timeout_s=0.2) is False  # the sidecar is dead

        proc = _start_sidecar(config, log)  # same data dir, same port
        assert ex.force_flush(timeout_s=60), ex.stats()

        # The restarted sidecar indexed everything (including incidents written just before
        # the kill whose index row or ack never happened) and serves it.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = v1.IncidentServiceStub(ch)
            page = stub.ListIncidents(v1.ListIncidentsRequest(page_size=1000), timeout=30)
        listed = {i.id for i in page.incidents}
        assert page.total_size == len(listed)
    finally:
        if killer is not None:
            killer.cancel()
        ex.shutdown(timeout_s=5)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)

    # No silent loss: every incident is present and intact, or counted as dropped.
    stats = ex.stats()
    drops = metrics.snapshot()["dropped"]
    assert sum(drops.values()) == len(failed) == sum(stats["dropped"].values())
    assert set(drops) <= {"spool_full", "export_failed"}
    assert stats["drained"] == len(spooled)
    assert len(acked) + len(spooled) + len(failed) == N
    on_disk = {p.stem for p in (data / "incidents").glob("*.arrow")}
    assert on_disk == set(acked) | set(spooled)
    assert not on_disk & set(failed)
    for inc in incidents:
        if inc.id in on_disk:
            stored = Incident.open(data / "incidents" / f"{inc.id}.arrow")
            assert stored.to_bytes() == inc.to_bytes()
    assert not list((tmp_path / "spool").glob("*.arrow"))

    assert listed == on_disk
    print(f"acked={len(acked)} spooled={len(spooled)} dropped={drops} "
          f"drained={stats['drained']} retries={stats['retries']}")
