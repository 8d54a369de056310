"""Chaos probes of an unlucky operator: a hung sidecar, stalled upload streams, a full disk.

* :func:`probe_hung` — the sidecar is SIGSTOPped for ``stop_s`` while one thread (the recorder's
  export worker) exports paced incidents through the real ``SidecarExporter`` with a roomy spool;
  SIGCONT; then everything must be stored, nothing dropped, the spool empty.
* :func:`probe_stalls` — more upload streams than ``grpc.max_workers`` send a header and then
  nothing: the ones over ``limits.max_concurrent_uploads`` are refused ``busy`` at once, the
  health check and ``ListIncidents`` keep answering, the idle timeout cancels the rest (counted).
* :func:`probe_disk_full` — a sidecar whose data dir is a 30 MiB tmpfs (with an 8 MiB ballast
  file an operator can delete) takes 1 MiB incidents until it refuses one: a typed, counted
  refusal, a store that still agrees with itself, an exporter that spools instead of dropping,
  and recovery once the ballast is deleted.

Example::

    rows = probe_hung(lab, sc, stop_s=10, rate_hz=40)
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chaos_lab import (
    Answer,
    Lab,
    MiB,
    Row,
    SidecarProc,
    answer_of,
    make_incident,
    rejected_delta,
    stored_ids,
    try_upload,
)


def _config(sc: SidecarProc) -> Any:
    """The sidecar's effective config (its YAML over the embedded defaults)."""
    import yaml

    from sidecar._config import SidecarConfig

    return SidecarConfig.from_dict(yaml.safe_load(sc.config.read_text()))


def probe_hung(lab: Lab, sc: SidecarProc, *, stop_s: float, rate_hz: float) -> list[Row]:
    """SIGSTOP ``stop_s`` during a paced stream (module doc); one row."""
    ex, metrics = lab.exporter(sc, "acme", "hung")
    warm = [make_incident(f"hung-w{i}", tenant="acme", floats=256, seed=i) for i in range(10)]
    n = int(stop_s * rate_hz)
    hung = [make_incident(f"hung-{i:04d}", tenant="acme", floats=256, seed=1000 + i)
            for i in range(n)]
    for inc in warm:
        ex.export(inc)
    slowest = 0.0
    sc.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        for i, inc in enumerate(hung):
            time.sleep(max(0.0, t0 + i / rate_hz - time.monotonic()))
            start = time.monotonic()
            ex.export(inc)
            slowest = max(slowest, time.monotonic() - start)
        time.sleep(max(0.0, t0 + stop_s - time.monotonic()))
    finally:
        sc.signal(signal.SIGCONT)
    flushed = ex.force_flush(timeout_s=120)
    stats, dropped = ex.stats(), metrics.snapshot()["dropped"]
    ex.shutdown(timeout_s=5)
    want = {inc.id for inc in warm + hung}
    stored = want & set(stored_ids(lab, sc, "acme"))
    figures = {"incidents": len(want), "stopped_s": stop_s, "rate_hz": rate_hz,
               "acked": stats["acked"], "spooled": stats["spooled"],
               "drained": stats["drained"], "dropped": dropped, "stored": len(stored),
               "slowest_export_s": round(slowest, 3), "flushed": flushed}
    ok = flushed and not dropped and len(stored) == len(want) and stats["spool_entries"] == 0
    return [Row("hung", f"SIGSTOP {stop_s:g} s while the export worker sends {n} incidents "
                f"({rate_hz:g}/s), then SIGCONT",
                "nothing dropped (the spool has room); all stored after SIGCONT",
                f"spooled {stats['spooled']}, dropped {sum(dropped.values())}, acked inline "
                f"{stats['acked']}, drained {stats['drained']}; stored {len(stored)}/{len(want)}; "
                f"slowest export() {slowest:.2f} s", ok, figures)]


# ---------------------------------------------------------------------------- stalls
def _timed(call: Callable[[], Any]) -> tuple[float, str]:
    import grpc

    t0 = time.monotonic()
    try:
        call()
        code = "OK"
    except grpc.RpcError as e:
        code = answer_of(e).code
    return time.monotonic() - t0, code


def _meanwhile(c: Any) -> dict[str, Any]:
    """Health check and ListIncidents, 5 each, while the streams stall: latency and codes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sidecar.api import v1

    health = health_pb2_grpc.HealthStub(c.channel)
    out: dict[str, Any] = {"health": [], "list": []}
    for _ in range(5):
        out["health"].append(_timed(lambda: health.Check(health_pb2.HealthCheckRequest(),
                                                         timeout=5)))
        out["list"].append(_timed(lambda: c.stub.ListIncidents(
            v1.ListIncidentsRequest(page_size=10), timeout=5, metadata=c.metadata)))
    return {k: {"max_s": round(max(t for t, _ in v), 3), "codes": sorted({x for _, x in v})}
            for k, v in out.items()}


def probe_stalls(lab: Lab, sc: SidecarProc, raw: Callable[..., Any]) -> list[Row]:
    """``grpc.max_workers + 4`` stalled uploads (module doc); one row."""
    cfg = _config(sc)
    slots, workers = cfg.limits.max_concurrent_uploads, cfg.grpc.max_workers
    n, idle_s = workers + 4, cfg.limits.idle_timeout_s
    data = make_incident("stall", tenant="acme", floats=256, seed=3).to_bytes()
    release = threading.Event()
    before = sc.rejected()
    with lab.client(sc, "acme") as c:
        t0 = time.monotonic()
        calls = [c.stub.UploadIncident.future(raw(f"stall-{i}", data, after_header=release.wait),
                                              timeout=60, metadata=c.metadata) for i in range(n)]
        try:
            time.sleep(1.0)
            early = [answer_of(f.exception()) for f in calls if f.done()]
            meanwhile = _meanwhile(c)
            ends = [(f.exception(timeout=idle_s + 10), time.monotonic() - t0) for f in calls]
        finally:
            release.set()
        late = [answer_of(e) for e, _ in ends]
        cancelled_s = max((t for e, t in ends if answer_of(e).code == "CANCELLED"), default=0.0)
        after = c.upload("stall-after", make_incident("stall-after", tenant="acme", floats=256,
                                                      seed=4).to_bytes()).created
    delta = rejected_delta(before, sc.rejected())
    busy = sum(a.reason == "busy" for a in early)
    held_codes = sorted({a.code for a in late} - {"RESOURCE_EXHAUSTED"})
    figures = {"streams": n, "busy_at_once": busy, "meanwhile": meanwhile,
               "held_codes": held_codes, "cancelled_after_s": round(cancelled_s, 2),
               "rejected": delta, "upload_after": after}
    ok = (busy == n - slots and delta == {"busy": n - slots, "idle_timeout": slots}
          and held_codes == ["CANCELLED"] and cancelled_s <= idle_s + 3.0 and after
          and meanwhile["health"]["codes"] == ["OK"] and meanwhile["list"]["codes"] == ["OK"]
          and meanwhile["health"]["max_s"] < 1.0 and meanwhile["list"]["max_s"] < 1.0)
    return [Row("stall", f"{n} uploads send a header, then nothing ({slots} slots, {workers} "
                "handler threads)",
                f"{n - slots} refused busy at once; health + ListIncidents answer < 1 s; the "
                f"{slots} held cancelled by the {idle_s:g} s idle timeout, counted",
                f"busy {busy}; health max {meanwhile['health']['max_s']} s "
                f"{meanwhile['health']['codes']}, list max {meanwhile['list']['max_s']} s "
                f"{meanwhile['list']['codes']}; held ended {held_codes} by "
                f"{cancelled_s:.1f} s; counted {delta}; next upload ok {after}", ok, figures)]


# ---------------------------------------------------------------------------- disk full
def _fill(c: Any, *, limit: int = 60) -> tuple[list[Any], Answer, Any]:
    """Upload 1 MiB incidents until one is refused: (stored ones, the refusal, the refused)."""
    stored: list[Any] = []
    for i in range(limit):
        inc = make_incident(f"disk-{i:03d}", tenant="acme", floats=256 * 1024, seed=500 + i)
        answer = try_upload(c, inc)
        if answer.code != "OK":
            return stored, answer, inc
        stored.append(inc)
    raise RuntimeError(f"{limit} MiB fitted on a 30 MiB tmpfs: the disk never filled")


def _consistent(lab: Lab, sc: SidecarProc, want: list[Any]) -> str:
    """'' when the listing is exactly ``want`` with identical bytes and no temp file; else why."""
    listed = [i for i in stored_ids(lab, sc, "acme") if i.startswith("disk-")]
    if sorted(listed) != sorted(inc.id for inc in want):
        return f"listed {len(listed)} != stored {len(want)}"
    with lab.client(sc, "acme") as c:
        bad = [inc.id for inc in want if c.download(inc.id) != inc.to_bytes()]
    if bad:
        return f"bytes differ for {bad[:3]}"
    return f"temp files {len(sc.temp_files())}" if sc.temp_files() else ""


def probe_disk_full(lab: Lab) -> list[Row]:
    """A 30 MiB tmpfs data dir (module doc); one row (not run without root)."""
    mnt = lab.root / "tmpfs"
    why = lab.mount_tmpfs(mnt, size_mib=30)
    attack = "data dir on a 30 MiB tmpfs, 1 MiB incidents until full; then free 8 MiB"
    expected = ("typed refusal, counted; store consistent (listing = files, bytes identical, "
                "no temp files); exporter spools, nothing dropped; recovers once space is freed")
    if why:
        return [Row("disk_full", attack, expected, f"not run: {why}", None)]
    try:
        return [_disk_full(lab, mnt, attack, expected)]
    finally:
        if "disk" in lab.sidecars:
            lab.sidecars["disk"].stop()
        lab.umount(mnt)


def _disk_full(lab: Lab, mnt: Path, attack: str, expected: str) -> Row:
    (mnt / "ballast").write_bytes(bytes(8 * MiB))
    sc = lab.sidecar("disk", data_dir=mnt / "data")
    before = sc.rejected()
    with lab.client(sc, "acme") as c:
        stored, refusal, refused = _fill(c)
    counted = rejected_delta(before, sc.rejected())
    full_state = _consistent(lab, sc, stored)
    ex, metrics = lab.exporter(sc, "acme", "disk")
    extra = [make_incident(f"disk-x{i}", tenant="acme", floats=256 * 1024, seed=900 + i)
             for i in range(3)]
    for inc in extra:
        ex.export(inc)
    spooled = ex.stats()["spooled"]
    (mnt / "ballast").unlink()
    flushed = ex.force_flush(timeout_s=60)
    dropped = metrics.snapshot()["dropped"]
    ex.shutdown(timeout_s=5)
    with lab.client(sc, "acme") as c:
        redo = try_upload(c, refused)
    after_state = _consistent(lab, sc, [*stored, refused, *extra])
    figures = {"stored_before_full": len(stored), "refusal": str(refusal),
               "refusal_details": refusal.details[:300], "counted": counted,
               "exporter_spooled": spooled, "exporter_dropped": dropped, "flushed": flushed,
               "consistent_when_full": full_state or "yes",
               "consistent_after": after_state or "yes", "sidecar_alive": sc.alive()}
    typed = refusal.code != "UNKNOWN" and refusal.reason != "" and \
        counted.get(refusal.reason, 0) >= 1
    ok = (typed and not full_state and not after_state and spooled == len(extra)
          and not dropped and flushed and redo.code == "OK" and sc.alive())
    return Row("disk_full", attack, expected,
               f"{len(stored)} stored, then {refusal} ('{refusal.details[:90]}'), counted "
               f"{counted}; consistent when full: {full_state or 'yes'}; exporter spooled "
               f"{spooled}, dropped {sum(dropped.values())}; after freeing: flushed {flushed}, "
               f"refused one re-uploaded {redo}, consistent: {after_state or 'yes'}", ok, figures)
