"""The ``ingest`` and ``chaos`` sections of ``benchmarks/fleet.py`` (issue 16, DESIGN §12).

``ingest``: N sidecar processes (N = 1, 2, 4) on one PostgreSQL catalog, sharing one incident
store, each fed round-robin by ``--clients`` uploader threads; incidents/s acknowledged and the
median ack latency, the N interleaved in every repetition (same machine, same minute), and
every incident listed through sidecar 0 afterwards (the fleet-wide catalog).

``chaos``: two sidecars on one PostgreSQL catalog running their ``stats`` jobs on a real Ray
cluster (a ``ray start --head`` child). During a 200-incident stream the catalog is stopped
and restarted, then every Ray worker process is ``kill -9``ed (twice). The uploader retries an
upload until it is acknowledged, as the middleware's exporter does. Checked afterwards: every
acknowledged incident is listed and downloaded byte-identical through the *other* sidecar, and
every incident's job is ``done`` (attempts > 1 = a retry after a lost worker).

Example::

    python benchmarks/fleet.py ingest --reps 3 --incidents 200
    python benchmarks/fleet.py chaos --json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

from benchmarks.chaos_lab import Lab, SidecarProc, make_incident
from benchmarks.fleet_lab import ray_worker_pids, start_fleet, start_ray_head

__all__ = ["run_chaos", "run_ingest"]

TENANT = "acme"


def _blob(incident_id: str, *, floats: int, seed: int) -> bytes:
    return make_incident(incident_id, tenant=TENANT, floats=floats, seed=seed).to_bytes()


def _upload_all(lab: Lab, fleet: list[SidecarProc], ids: list[str], blobs: dict[str, bytes], *,
                clients: int) -> tuple[float, list[float]]:
    """Upload ``ids`` round-robin over ``fleet`` from ``clients`` threads; (wall s, latencies)."""
    local = threading.local()

    def one(k: int) -> float:
        if not hasattr(local, "cs"):
            local.cs = [lab.client(sc, TENANT, timeout_s=60) for sc in fleet]
        t0 = time.perf_counter()
        r = local.cs[k % len(fleet)].upload(ids[k], blobs[ids[k]])
        assert r.created, ids[k]
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        lat = list(pool.map(one, range(len(ids))))
    return time.perf_counter() - t0, lat


def run_ingest(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ingest`` section (module doc)."""
    from tests._postgres import PostgresServer

    out: dict[str, Any] = {"ns": args.ns, "reps": args.reps, "incidents": args.incidents,
                           "clients": args.clients, "floats": args.floats, "runs": []}
    with Lab(seed=0) as lab, PostgresServer.start_new() as pg:
        fleets = {n: start_fleet(lab, n=n, dsn=pg.create_database(f"f{n}"), name=f"f{n}")
                  for n in args.ns}
        for rep in range(args.reps):
            for n in (args.ns if rep % 2 == 0 else list(reversed(args.ns))):
                ids = [f"r{rep}-{k:05d}" for k in range(args.incidents)]
                blobs = {i: _blob(i, floats=args.floats, seed=k) for k, i in enumerate(ids)}
                wall, lat = _upload_all(lab, fleets[n], ids, blobs, clients=args.clients)
                run = {"n": n, "rep": rep, "wall_s": round(wall, 3),
                       "per_s": round(len(ids) / wall, 1),
                       "ack_median_ms": round(1000 * statistics.median(lat), 1),
                       "bytes": len(next(iter(blobs.values())))}
                out["runs"].append(run)
                print(f"ingest rep {rep} N={n}: {run['per_s']}/s, ack median "
                      f"{run['ack_median_ms']} ms", file=sys.stderr, flush=True)
        for n, fleet in fleets.items():     # every incident listed through sidecar 0
            with lab.client(fleet[0], TENANT) as c:
                out.setdefault("listed", {})[n] = sum(1 for _ in c.list_all(page_size=1000))
    out["summary"] = {n: {"per_s_median": statistics.median(r["per_s"] for r in out["runs"]
                                                            if r["n"] == n),
                          "ack_median_ms": statistics.median(r["ack_median_ms"]
                                                             for r in out["runs"] if r["n"] == n)}
                      for n in args.ns}
    return out


# -- chaos --------------------------------------------------------------------------------------


def _upload_until_acked(lab: Lab, sc: SidecarProc, incident_id: str, blob: bytes,
                        log: dict[str, int]) -> None:
    """Retry (short backoff) until acknowledged, as the middleware's exporter does."""
    deadline = time.monotonic() + 300
    while True:
        try:
            with lab.client(sc, TENANT, timeout_s=30) as c:
                c.upload(incident_id, blob)
            return
        except Exception as e:   # grpc.RpcError (UNAVAILABLE, ...): counted, retried
            code = getattr(e, "code", lambda: None)()
            log[str(code)] = log.get(str(code), 0) + 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _kill_ray_workers(events: list[dict[str, Any]], k: int) -> None:
    pids = ray_worker_pids()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    events.append({"at": k, "event": f"kill -9 of {len(pids)} Ray worker processes"})


def _jobs(dsn: str) -> list[tuple[str, str, int]]:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=5) as con:
        return [(r[0], r[1], int(r[2])) for r in con.execute(
            "SELECT incident_id, state, attempts FROM jobs WHERE kind = 'stats'")]


def _recovered(lab: Lab, fleet: list[SidecarProc], dsn: str, acked: dict[str, str]) -> bool:
    try:
        with lab.client(fleet[1], TENANT) as c:
            listed = {i.id for i in c.list_all(page_size=1000)}
        jobs = _jobs(dsn)
    except Exception:
        return False
    done = {i for i, state, _ in jobs if state == "done"}
    return set(acked) <= listed and set(acked) <= done and \
        not any(state in ("pending", "running") for _, state, _ in jobs)


def run_chaos(args: argparse.Namespace) -> dict[str, Any]:
    """The ``chaos`` section (module doc)."""
    from tests._postgres import PostgresServer

    events: list[dict[str, Any]] = []
    errors: dict[str, int] = {}
    acked: dict[str, str] = {}
    with Lab(seed=0, keep=bool(os.environ.get("FLEET_KEEP"))) as lab, \
            PostgresServer.start_new() as pg:
        address, ray_env = start_ray_head(lab, num_cpus=2)
        dsn = pg.create_database("chaos")
        fleet = start_fleet(lab, n=2, dsn=dsn, name="chaos", env=ray_env, jobs={
            "executor": "ray", "ray": {"address": address, "num_cpus": 1},
            "on_ingest": ["stats"], "workers": 2})
        t0 = time.monotonic()
        for k in range(args.incidents):
            if k == args.catalog_down_at:
                pg.stop()
                events.append({"at": k, "event": "catalog (PostgreSQL) stopped"})
            if k == args.catalog_up_at:
                pg.start()
                events.append({"at": k, "event": "catalog restarted"})
            if k in args.kill_at:
                _kill_ray_workers(events, k)
            incident_id = f"chaos-{k:04d}"
            blob = _blob(incident_id, floats=args.floats, seed=k)
            _upload_until_acked(lab, fleet[k % 2], incident_id, blob, errors)
            acked[incident_id] = hashlib.sha256(blob).hexdigest()
            time.sleep(args.interval_s)
        stream_s = time.monotonic() - t0
        t1 = time.monotonic()
        while time.monotonic() - t1 < args.recovery_timeout_s:
            if _recovered(lab, fleet, dsn, acked):
                break
            time.sleep(1.0)
        recovery_s = time.monotonic() - t1
        jobs = _jobs(dsn)
        identical = 0
        for k, (incident_id, sha) in enumerate(sorted(acked.items())):
            with lab.client(fleet[(k + 1) % 2], TENANT) as c:      # the other sidecar
                identical += hashlib.sha256(c.download(incident_id)).hexdigest() == sha
        with lab.client(fleet[1], TENANT) as c:
            listed = {i.id for i in c.list_all(page_size=1000)}
    by_state: dict[str, int] = {}
    for _, state, _ in jobs:
        by_state[state] = by_state.get(state, 0) + 1
    return {"incidents": args.incidents, "events": events, "upload_errors_retried": errors,
            "acknowledged": len(acked), "lost": len(set(acked) - listed),
            "byte_identical_through_the_other_sidecar": identical,
            "jobs": by_state, "jobs_per_incident": len(jobs) / max(1, len(acked)),
            "retried_jobs": sum(a > 1 for _, _, a in jobs),
            "stream_s": round(stream_s, 1), "recovery_s": round(recovery_s, 1)}
