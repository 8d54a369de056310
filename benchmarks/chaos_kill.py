"""Chaos probes by ``kill -9``: of the sidecar under streaming clients, and of clients mid-upload.

* :func:`probe_sidecar_kills` — client threads, each the middleware's real ``SidecarExporter``
  with its own disk spool (like separate serving processes), stream paced incidents while a
  killer thread ``kill -9``s the sidecar at random moments and restarts it on the same data dir.
  Afterwards (sidecar up, spools flushed) every acknowledged incident must be stored with
  identical bytes, every unacknowledged one re-sent from the spool or counted dropped by reason,
  nothing stored twice or unknown.
* :func:`probe_client_kills` — a slow client process is ``kill -9``ed mid-upload: nothing
  partial becomes visible and the sidecar's temp file goes away at once; then client *and*
  sidecar are killed mid-upload: the temp file left on disk is removed by the restart's recovery,
  and the same id uploads cleanly afterwards.

Example::

    rows = probe_sidecar_kills(lab, sc, clients=4, per_client=250, duration_s=75, rng=rng)
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from chaos_lab import Lab, Row, SidecarProc, make_incident, rejected_delta, stored_ids

CHAOS_PY = Path(__file__).with_name("chaos.py")
#: Activation sizes (float32 values) of the streamed incidents: 256 B to 1 MiB of tensor.
_SIZES, _WEIGHTS = (64, 1024, 16384, 262144), (5, 3, 2, 1)


@dataclasses.dataclass
class _Client:
    """One streaming client: its exporter, incidents and what ``export`` said for each."""

    exporter: Any
    metrics: Any
    incidents: list[Any]
    acked: list[str] = dataclasses.field(default_factory=list)
    spooled: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    slowest_s: float = 0.0

    def stream(self, t0: float, duration_s: float) -> None:
        """Export every incident, paced evenly over ``duration_s`` from ``t0``."""
        n = len(self.incidents)
        for i, inc in enumerate(self.incidents):
            time.sleep(max(0.0, t0 + i * duration_s / n - time.monotonic()))
            before = self.exporter.stats()["acked"]
            start = time.monotonic()
            ok = self.exporter.export(inc).name == "SUCCESS"
            self.slowest_s = max(self.slowest_s, time.monotonic() - start)
            if not ok:
                self.failed.append(inc.id)
            elif self.exporter.stats()["acked"] == before + 1:
                self.acked.append(inc.id)
            else:
                self.spooled.append(inc.id)


def _killer(sc: SidecarProc, rng: random.Random, stop: threading.Event,
            interval_s: tuple[float, float], kills: list[dict[str, float]],
            errors: list[str]) -> None:
    """kill -9 at random moments until ``stop``; restart after a random 0-1 s downtime. Each
    kill records the upload temp files it left (uploads it caught mid-flight)."""
    t0 = time.monotonic()
    try:
        while not stop.wait(rng.uniform(*interval_s)):
            at = time.monotonic() - t0
            sc.kill9()
            caught = len(sc.temp_files())
            time.sleep(rng.uniform(0.0, 1.0))
            kills.append({"at_s": round(at, 2), "mid_upload": caught,
                          "restart_s": round(sc.start(), 2)})
    except Exception as e:   # reported in the table, never a hang
        errors.append(f"{type(e).__name__}: {e}")


def _clients(lab: Lab, sc: SidecarProc, *, n: int, per_client: int,
             rng: random.Random) -> list[_Client]:
    out = []
    for k in range(n):
        ex, metrics = lab.exporter(sc, "acme", f"kill-{k}")
        incs = [make_incident(f"kill-c{k}-{i:04d}", tenant="acme", seed=k * 100_000 + i,
                              floats=rng.choices(_SIZES, _WEIGHTS)[0])
                for i in range(per_client)]
        out.append(_Client(ex, metrics, incs))
    return out


def probe_sidecar_kills(lab: Lab, sc: SidecarProc, *, clients: int, per_client: int,
                        duration_s: float, interval_s: tuple[float, float],
                        rng: random.Random) -> list[Row]:
    """The kill -9 stream (module doc); one row."""
    cs = _clients(lab, sc, n=clients, per_client=per_client, rng=rng)
    stop = threading.Event()
    kills: list[dict[str, float]] = []
    errors: list[str] = []
    killer = threading.Thread(target=_killer, args=(sc, rng, stop, interval_s, kills, errors),
                              daemon=True)
    t0 = time.monotonic()
    threads = [threading.Thread(target=c.stream, args=(t0, duration_s), daemon=True)
               for c in cs]
    for t in [killer, *threads]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    killer.join(timeout=120)
    if not sc.alive():
        sc.start()
    flushed = all(c.exporter.force_flush(timeout_s=180) for c in cs)
    for c in cs:
        c.exporter.shutdown(timeout_s=5)
    figures: dict[str, Any] = _verify_kills(lab, sc, cs)
    figures.update(kills=len(kills), kill_times_s=[k["at_s"] for k in kills],
                   uploads_caught_mid_flight=sum(int(k["mid_upload"]) for k in kills),
                   restart_s_max=max((k["restart_s"] for k in kills), default=0.0),
                   flushed=flushed, killer_errors=errors,
                   stream_s=round(time.monotonic() - t0, 1))
    ok = (flushed and not errors and figures["acked_lost"] == 0 and figures["mismatched"] == 0
          and figures["duplicates"] == 0 and figures["unknown"] == 0
          and figures["unaccounted"] == 0 and figures["spool_left"] == 0 and len(kills) > 0)
    return [Row("kill_sidecar", f"kill -9 of the sidecar x{len(kills)} at random moments, "
                f"{clients} exporters streaming {figures['incidents']} incidents",
                "0 acked lost, bytes identical, every unacked re-sent from the spool or counted "
                "dropped by reason, no duplicates",
                _kill_summary(figures), ok, figures)]


def _kill_summary(f: dict[str, Any]) -> str:
    return (f"{f['uploads_caught_mid_flight']} uploads caught mid-flight; "
            f"acked {f['acked']} (lost {f['acked_lost']}), spooled {f['spooled']} -> drained "
            f"{f['drained']}, dropped {f['dropped'] or 0}; stored {f['stored']}, bytes differ "
            f"{f['mismatched']}, duplicates {f['duplicates']}, unknown {f['unknown']}, "
            f"unaccounted {f['unaccounted']}")


def _verify_kills(lab: Lab, sc: SidecarProc, cs: list[_Client]) -> dict[str, Any]:
    """Stored vs acknowledged vs spooled vs dropped, and the stored bytes."""
    sent = {inc.id: inc for c in cs for inc in c.incidents}
    listed = [i for i in stored_ids(lab, sc, "acme") if i in sent or i.startswith("kill-")]
    stored = set(listed)
    acked = {i for c in cs for i in c.acked}
    drained = sum(c.exporter.stats()["drained"] for c in cs)
    dropped: dict[str, int] = {}
    for c in cs:
        for reason, n in c.metrics.snapshot()["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + int(n)
    unacked = sum(len(c.spooled) + len(c.failed) for c in cs)
    with lab.client(sc, "acme") as client:
        mismatched = sum(client.download(i) != sent[i].to_bytes() for i in sorted(stored & set(sent)))
    return {
        "incidents": len(sent), "acked": len(acked), "acked_lost": len(acked - stored),
        "spooled": sum(len(c.spooled) for c in cs), "failed": sum(len(c.failed) for c in cs),
        "drained": drained, "dropped": dropped, "stored": len(stored),
        "mismatched": mismatched, "duplicates": len(listed) - len(stored),
        "unknown": len(stored - set(sent)),
        # every incident exported once; stored = acked + drained; every unacked one drained
        # or counted as dropped
        "unaccounted": abs(len(sent) - len(acked) - unacked)
                       + abs(len(stored) - len(acked) - drained)
                       + abs(unacked - drained - sum(dropped.values())),
        "spool_left": sum(c.exporter.stats()["spool_entries"] for c in cs),
        "slowest_export_s": round(max(c.slowest_s for c in cs), 3),
    }


# ---------------------------------------------------------------------------- client kills
def _slow_upload(lab: Lab, sc: SidecarProc, incident_id: str, *, mib: int,
                 chunks_before_kill: int = 8) -> Any:
    """A child process uploading ``mib`` MiB in 64 KiB chunks, 20 ms apart; returned once it
    has sent ``chunks_before_kill`` chunks (so a kill lands mid-upload)."""
    spec = {"address": sc.address, "token": lab.tokens["acme"], "id": incident_id, "mib": mib}
    child = lab.spawn([sys.executable, str(CHAOS_PY), "--child-upload", json.dumps(spec)])
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith(b"chunk ") and int(line.split()[1]) >= chunks_before_kill:
            return child
    raise RuntimeError(f"the upload child ended before sending {chunks_before_kill} chunks")


def _wait_until(check: Any, timeout_s: float) -> float | None:
    """Seconds until ``check()`` held (polled), None if it never did in ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if check():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def _visible(lab: Lab, sc: SidecarProc, incident_id: str) -> bool:
    return incident_id in stored_ids(lab, sc, "acme")


def probe_client_kills(lab: Lab, sc: SidecarProc) -> list[Row]:
    """kill -9 of a client mid-upload, then of client and sidecar together (module doc)."""
    before = sc.rejected()
    child = _slow_upload(lab, sc, "ckill-1", mib=4)
    during = len(sc.temp_files())
    child.kill()
    child.wait()
    gone_s = _wait_until(lambda: not sc.temp_files(), 10.0)
    delta = rejected_delta(before, sc.rejected())
    visible = _visible(lab, sc, "ckill-1")
    a = Row("kill_client", "kill -9 of a client mid-upload (4 MiB, 64 KiB chunks)",
            "no partial incident visible; temp file removed; counted (cancelled)",
            f"visible {visible}; temp files {during} during -> 0 after "
            f"{'never' if gone_s is None else f'{gone_s:.2f} s'}; counted {delta}",
            not visible and during > 0 and gone_s is not None and delta == {"cancelled": 1},
            {"temp_during": during, "temp_gone_s": gone_s, "rejected": delta})
    child = _slow_upload(lab, sc, "ckill-2", mib=4)
    sc.kill9()
    child.kill()
    child.wait()
    left = len(sc.temp_files())
    sc.start()
    after = len(sc.temp_files())
    visible = _visible(lab, sc, "ckill-2")
    redo = make_incident("ckill-2", tenant="acme", floats=1024, seed=7)
    with lab.client(sc, "acme") as c:
        created = c.upload("ckill-2", redo.to_bytes()).created
        same = c.download("ckill-2") == redo.to_bytes()
    b = Row("kill_client", "kill -9 of client and sidecar together mid-upload, restart",
            "temp file left by the crash removed by recovery; nothing visible; the id uploads "
            "cleanly afterwards",
            f"temp files {left} after the crash -> {after} after restart; visible {visible}; "
            f"re-upload created {created}, bytes identical {same}",
            left > 0 and after == 0 and not visible and created and same,
            {"temp_left": left, "temp_after_restart": after})
    return [a, b]
