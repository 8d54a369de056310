"""The chaos run of issue 14: kills, hangs, a full disk, stalled streams, bombs and tenant probes
against real sidecar processes on loopback, as one bounded run that prints a table.

Every probe attacks a real ``forensics sidecar serve`` subprocess (bearer tokens for two tenants,
``/metrics`` scraped over HTTP) through the public clients — the middleware's
``SidecarExporter`` with its disk spool, ``SidecarClient`` — or, for uploads that lie about
their framing, through :func:`raw_messages`, the one builder of malformed upload streams. Each
probe yields rows (attack, expected, observed, pass/FAIL); an observation that does not match
its expectation is a FAIL in the table, never hidden. Probes, in order:

* ``kill_sidecar`` — kill -9 at random moments while exporters stream >= 1,000 incidents
  (``benchmarks/chaos_kill.py``); ``kill_client`` — kill -9 of clients mid-upload;
* ``hung`` — SIGSTOP 10 s during a stream; ``stall`` — stalled upload streams beyond the slot
  count; ``disk_full`` — a 30 MiB tmpfs data dir (``benchmarks/chaos_faults.py``);
* ``bomb`` — zstd bomb, nested / huge manifest, 200k empty batches, 1M rows, over-size chunk,
  lying total_size, endless empty chunks, each with the sidecar's peak RSS
  (``benchmarks/chaos_bombs.py``);
* ``tenant`` — another tenant's ids through every RPC, job options and upload headers
  (``benchmarks/chaos_tenants.py``).

Everything lives in one temp dir and every process (and the tmpfs) is removed at the end, also
on Ctrl-C or SIGTERM. The sidecars run with the default limits of ``configs/sidecar.yaml`` but
one: ``idle_timeout_s`` 5 s (default 30 s; keeps the stall probe short).

Usage::

    python benchmarks/chaos.py                 # full run (>= 1,000 incidents; a few minutes)
    python benchmarks/chaos.py --quick         # fewer incidents and kills (about a minute)
    python benchmarks/chaos.py --json          # the result document as JSON on stdout
    python benchmarks/chaos.py --only bomb,tenant --keep
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import chaos_bombs  # sibling scripts (benchmarks/ is not a package)
import chaos_faults
import chaos_kill
import chaos_tenants
from chaos_lab import Lab, MiB, Row, make_incident, sigterm_as_interrupt, upload_answer

KiB = 1024
PROBES = ("kill_sidecar", "kill_client", "hung", "stall", "disk_full", "bomb", "tenant")
#: The chaos sidecar's limits beyond the defaults (module doc).
LIMITS = {"idle_timeout_s": 5.0}
#: Run sizes: (full, quick).
SIZES: dict[str, tuple[Any, Any]] = {
    "clients": (4, 2), "per_client": (250, 80), "stream_s": (75.0, 10.0),
    "kill_interval_s": ((2.0, 8.0), (1.5, 4.0)), "hung_s": (10.0, 4.0), "hung_hz": (40.0, 40.0),
}


def raw_messages(incident_id: str, data: bytes, *, chunk_size: int = 64 * KiB,
                 declare_size: int | None = None, empty_chunks: int = 0,
                 after_header: Callable[[], object] | None = None,
                 after_chunk: Callable[[int], object] | None = None,
                 ) -> Iterator[Any]:
    """An UploadIncident message stream that may lie: THE one place the chaos run frames uploads
    itself (the wire protocol lives in ``sidecar._client.upload_requests``; this only bends it).

    ``declare_size`` replaces the header's total_size, ``empty_chunks`` empty chunk messages
    follow the header, ``after_header()`` runs once the header is handed to gRPC (block in it
    to stall the stream), ``after_chunk(n)`` after the n-th data chunk (pace or report there).

    Example::

        client.stub.UploadIncident(raw_messages("inc-1", data, declare_size=10), timeout=10)
    """
    from sidecar._client import upload_requests
    from sidecar.api import v1

    sent = 0
    for msg in upload_requests(incident_id, data, chunk_size=chunk_size):
        part = msg.WhichOneof("part")
        if part == "header" and declare_size is not None:
            msg.header.total_size = declare_size
        yield msg
        if part == "header":
            if after_header is not None:
                after_header()
            for _ in range(empty_chunks):
                yield v1.UploadIncidentRequest(chunk=v1.Chunk(data=b""))
        elif part == "chunk" and after_chunk is not None:
            sent += 1
            after_chunk(sent)


def child_upload(spec: dict[str, Any]) -> int:
    """(Child process of the ``kill_client`` probe.) A slow upload of ``spec["mib"]`` MiB: one
    64 KiB chunk per 20 ms, printing ``chunk <n>`` after each, until it is killed."""
    from sidecar import SidecarClient

    data = make_incident(spec["id"], tenant="acme", floats=spec["mib"] * MiB // 4,
                         seed=1).to_bytes()

    def tick(n: int) -> None:
        print(f"chunk {n}", flush=True)
        time.sleep(0.02)

    with SidecarClient(spec["address"], token=spec["token"]) as c:
        print(upload_answer(c, raw_messages(spec["id"], data, after_chunk=tick)), flush=True)
    return 0


def _guarded(name: str, probe: Callable[[], list[Row]]) -> list[Row]:
    """Run one probe; an exception is a FAIL row saying what broke, never a silent gap."""
    t0 = time.monotonic()
    try:
        rows = probe()
    except Exception as e:   # a probe that could not finish is a finding, not a crash
        rows = [Row(name, f"{name} probe", "completes",
                    f"raised {type(e).__name__}: {str(e)[:300]}", False)]
    for row in rows:
        row.figures.setdefault("probe_s", round(time.monotonic() - t0, 1))
    return rows


def _probes(lab: Lab, main: Any, *, quick: bool, rng: random.Random
            ) -> dict[str, Callable[[], list[Row]]]:
    def size(key: str) -> Any:
        return SIZES[key][1 if quick else 0]

    return {
        "kill_sidecar": lambda: chaos_kill.probe_sidecar_kills(
            lab, main, clients=size("clients"), per_client=size("per_client"),
            duration_s=size("stream_s"), interval_s=size("kill_interval_s"), rng=rng),
        "kill_client": lambda: chaos_kill.probe_client_kills(lab, main),
        "hung": lambda: chaos_faults.probe_hung(lab, main, stop_s=size("hung_s"),
                                                rate_hz=size("hung_hz")),
        "stall": lambda: chaos_faults.probe_stalls(lab, main, raw_messages),
        "disk_full": lambda: chaos_faults.probe_disk_full(lab),
        "bomb": lambda: chaos_bombs.probe_bombs(lab, main, raw_messages),
        "tenant": lambda: chaos_tenants.probe_tenants(lab, main),
    }


def run(*, quick: bool, seed: int, only: tuple[str, ...] = PROBES,
        keep: bool = False) -> dict[str, Any]:
    """The whole chaos run; the result document (rows, figures, machine, timings)."""
    t0 = time.monotonic()
    load_before = os.getloadavg()
    rows: list[Row] = []
    with sigterm_as_interrupt(), Lab(seed=seed, keep=keep) as lab:
        main = lab.sidecar("main", limits=LIMITS)
        probes = _probes(lab, main, quick=quick, rng=random.Random(seed))
        for name in PROBES:
            if name in only:
                rows += _guarded(name, probes[name])
                if not main.alive():   # a probe that left it dead must not sink the next ones
                    main.start()
        root = str(lab.root)
    return {
        "command": " ".join(["python", "benchmarks/chaos.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick, "seed": seed, "temp_dir": root, "kept": keep,
        "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": round(time.monotonic() - t0, 1), "limits": LIMITS,
        "passed": all(r.passed is not False for r in rows),
        "rows": [{**r.__dict__, "verdict": r.verdict} for r in rows],
    }


def table(doc: dict[str, Any]) -> str:
    """The rows as a Markdown table (attack, expected, observed, result)."""
    lines = ["| probe | attack | expected | observed | result |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        cells = [r["probe"], r["attack"], r["expected"], r["observed"], r["verdict"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    failed = sum(r["verdict"] == "FAIL" for r in doc["rows"])
    lines.append(f"\n{len(doc['rows'])} rows, {failed} FAIL; {doc['elapsed_s']} s; load "
                 f"{doc['loadavg_before']} -> {doc['loadavg_after']} on {doc['cpus']} CPUs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="fewer incidents and kills (~1 min)")
    p.add_argument("--json", action="store_true", help="print the result document as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments and sizes")
    p.add_argument("--only", default=",".join(PROBES), help=f"comma list of {PROBES}")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    p.add_argument("--child-upload", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_upload:
        return child_upload(json.loads(args.child_upload))
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(only) - set(PROBES)
    if unknown:
        p.error(f"unknown probe(s) {sorted(unknown)}; choose from {PROBES}")
    try:
        doc = run(quick=args.quick, seed=args.seed, only=only, keep=args.keep)
    except KeyboardInterrupt:
        print("chaos: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    print(json.dumps(doc, indent=1, default=str) if args.json else table(doc))
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
