"""Sidecar ingest vs raw gRPC streaming of the same bytes, as a ratio in one interleaved run.

Two modes on the same 64 MiB incidents (real ones, built with ``IncidentBuilder``):

* ``raw``    — grpcio client-streaming of the incident's bytes in 1 MiB chunks to a trivial
               servicer (a generic stream-unary handler with identity (de)serialisers) that
               consumes the chunks and answers with their count. No hashing, no disk.
* ``ingest`` — ``forensics.v1.IncidentService/UploadIncident`` end to end through the real
               client (``integrations.exporters.SidecarExporter``, which hashes while it sends):
               the real sidecar receives, writes a temp file (sha256 while writing), fsyncs,
               validates the Arrow stream + manifest + row digest, renames, fsyncs the
               directory, inserts the DuckDB index row and only then acks. The incident's own
               row digest is verified while the bytes stream in (``sidecar._ingest_digest``).
* ``ingest_serial`` — (reference) the same, on a second sidecar whose servicer verifies the row
               digest after the upload instead (``IncidentServicer.stream_digest = False``, the
               path before that optimisation): the A/B of the optimisation, in the same run.
* ``sha256`` — (reference, not part of the bar) one ``hashlib.sha256`` pass over the same bytes
               in this process: the unit of the ingest path's irreducible work. The protocol
               needs the transport sha256 on both ends (client trailer, server check) and the
               incident's own row digest is verified once more, so ingest does >= 3 such passes
               (overlapped with the network and with each other on idle cores).

Both servers run in ONE child process (the sidecar is its own process in production, and client
and server must not share a GIL); the client is this process. Every repetition runs both modes
on a fresh incident (each upload needs a distinct incident id), alternating which goes first, so
drift and machine noise hit both alike. Reported: per-mode medians and the median of the
per-repetition ratios ``raw_time / ingest_time`` (= ingest throughput / raw throughput; the bar
is >= 0.5). Stored incidents are deleted after each repetition (outside the timed region).

Usage::

    python benchmarks/ingest.py                      # 64 MiB incidents, 9 repetitions
    python benchmarks/ingest.py --mib 64 --reps 15 --json
    python benchmarks/ingest.py --profile            # + server-side phase timings of ingest
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

CHUNK = 1024 * 1024
RAW_METHOD = "/bench.Raw/Upload"


# ---------------------------------------------------------------------------- incidents
def build_incidents(n: int, *, mib: int, seed: int = 0) -> list[bytes]:
    """``n`` real incidents of about ``mib`` MiB each (float32 activations [1, 256, 1024] of
    1 MiB per site/step, plus input ids), each with its own id."""
    import torch

    from integrations.incident import IncidentBuilder, new_manifest

    out = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        m = new_manifest(id=f"bench-{os.getpid()}-{i}",
                         model={"name": "bench", "revision": None, "fingerprint": "b" * 64},
                         trigger={"rule": "flag", "reason": "benchmark", "step": 0},
                         request={"id": f"req-{i}", "tenant": "bench",
                                  "traceparent": "00-0af7651916cd43dd8448eb211c80319c-"
                                                 "b7ad6b7169203331-01"})
        b = IncidentBuilder(manifest=m)
        b.add(kind="input", site="input_ids", step=0,
              tensor=torch.arange(256, dtype=torch.int64).reshape(1, 256))
        n_rows = max(1, mib - 1)
        for j in range(n_rows):   # 8 layers x steps
            b.add(kind="activation", site=f"blocks.{j % 8}.resid_post", module_path=f"h.{j % 8}",
                  step=j // 8, tensor=torch.randn(1, 256, 1024, generator=gen))  # [b, pos, d]
        out.append(b.to_bytes())
    return out


# ---------------------------------------------------------------------------- server process
def _serve(data_dir: str, conn: Any, profile: bool) -> None:
    """Child process: the trivial raw servicer and the real sidecar, until told to stop."""
    import concurrent.futures as cf

    import grpc

    from sidecar import SidecarConfig, create_server

    def consume(request_iterator: Iterator[bytes], context: Any) -> bytes:
        n = 0
        for chunk in request_iterator:
            n += len(chunk)
        return str(n).encode()

    raw = grpc.server(cf.ThreadPoolExecutor(max_workers=4),
                      options=[("grpc.max_receive_message_length", CHUNK + 65536)])
    raw.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Raw", {
        "Upload": grpc.stream_unary_rpc_method_handler(consume)}),))
    raw_port = raw.add_insecure_port("127.0.0.1:0")
    raw.start()

    phases: dict[str, list[float]] = {}
    if profile:
        _instrument(phases)
    servers = []
    for sub, streamed in (("streamed", True), ("serial", False)):
        cfg = SidecarConfig.from_dict({"data_dir": f"{data_dir}/{sub}",
                                       "metrics": {"enabled": False},
                                       "modules": {"cf": {"enabled": False}}})
        sc, _ = create_server(cfg, port=0)
        sc.servicer.stream_digest = streamed
        sc.start()
        servers.append(sc)
    conn.send((raw_port, servers[0].port, servers[1].port))
    while True:
        msg = conn.recv()
        if msg == "phases":
            conn.send({k: list(v) for k, v in phases.items()})
            phases.clear()
            continue
        if msg == "stop":
            break
        if isinstance(msg, tuple) and msg[0] == "delete":   # not timed
            for sc in servers:
                sc.store.delete(msg[1])
            conn.send("ok")
    for sc in servers:
        sc.stop(grace=1.0)
    raw.stop(1.0)


def _instrument(phases: dict[str, list[float]]) -> None:
    """Wrap the store's ingest steps with timers (``--profile`` only)."""
    import functools

    from integrations.incident import Incident
    from sidecar import _store, _store_files

    def timed(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases.setdefault(name, []).append(time.perf_counter() - t0)
        return wrapper

    _store_files.IncomingFile.finish = timed(  # type: ignore[method-assign]
        "finish (drain+fsync)", _store_files.IncomingFile.finish)
    _store.LocalStore.put_incoming = timed(  # type: ignore[method-assign]
        "put_incoming (validate+rename+index)", _store.LocalStore.put_incoming)
    orig_open = Incident.open.__func__  # type: ignore[attr-defined]
    Incident.open = classmethod(  # type: ignore[method-assign,assignment]
        timed("Incident.open (validate+digest)", orig_open))


# ---------------------------------------------------------------------------- client side
def _raw_upload(channel: Any, data: bytes) -> float:
    call = channel.stream_unary(RAW_METHOD)

    def parts() -> Iterator[bytes]:
        view = memoryview(data)
        for off in range(0, len(data), CHUNK):
            yield bytes(view[off:off + CHUNK])

    t0 = time.perf_counter()
    got = call(parts(), timeout=300)
    dt = time.perf_counter() - t0
    if int(got) != len(data):
        raise RuntimeError(f"raw servicer consumed {got} bytes, sent {len(data)}")
    return dt


def _ingest_upload(exporter: Any, data: bytes) -> float:
    from integrations.exporters import ExportResult

    t0 = time.perf_counter()
    res = exporter.export(data)
    dt = time.perf_counter() - t0
    if res is not ExportResult.SUCCESS:
        raise RuntimeError(f"UploadIncident failed: {exporter.stats()}")
    return dt


def _sha256_pass(data: bytes) -> float:
    import hashlib

    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return time.perf_counter() - t0


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(*, mib: int, reps: int, warmup: int, profile: bool) -> dict[str, Any]:
    import grpc

    from integrations.exporters import SidecarExporter

    t_build = time.perf_counter()
    incidents = build_incidents(reps + warmup, mib=mib)
    build_s = time.perf_counter() - t_build
    sizes = [len(d) for d in incidents]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="forensics-ingest-bench-") as data_dir:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(data_dir, child, profile), daemon=True)
        proc.start()
        raw_port, port, serial_port = parent.recv()
        channel = grpc.insecure_channel(f"127.0.0.1:{raw_port}", options=[
            ("grpc.max_send_message_length", 4 * CHUNK)])
        exporter = SidecarExporter(f"127.0.0.1:{port}", deadline_s=300.0, max_retries=0)
        serial = SidecarExporter(f"127.0.0.1:{serial_port}", deadline_s=300.0, max_retries=0)
        load_before = _loadavg()
        raw_t: list[float] = []
        ing_t: list[float] = []
        sha_t: list[float] = []
        ser_t: list[float] = []
        try:
            for i, data in enumerate(incidents):
                modes = ["raw", "ingest", "ingest_serial"]
                order = modes[i % 3:] + modes[:i % 3]   # rotate: each mode leads in turn
                times = {"sha256": _sha256_pass(data)}
                for mode in order:
                    times[mode] = (_raw_upload(channel, data) if mode == "raw" else
                                   _ingest_upload(exporter if mode == "ingest" else serial, data))
                parent.send(("delete", f"bench-{os.getpid()}-{i}"))
                parent.recv()
                if i >= warmup:
                    raw_t.append(times["raw"])
                    ing_t.append(times["ingest"])
                    sha_t.append(times["sha256"])
                    ser_t.append(times["ingest_serial"])
            phases = None
            if profile:
                parent.send("phases")
                phases = parent.recv()
        finally:
            exporter.shutdown(timeout_s=1.0)
            serial.shutdown(timeout_s=1.0)
            channel.close()
            parent.send("stop")
            proc.join(10)
    ratios = [r / g for r, g in zip(raw_t, ing_t)]
    size = statistics.median(sizes)
    out: dict[str, Any] = {
        "incident_bytes": int(size), "reps": reps, "warmup": warmup,
        "build_s": round(build_s, 2),
        "raw_median_s": statistics.median(raw_t), "ingest_median_s": statistics.median(ing_t),
        "raw_MiBps": size / statistics.median(raw_t) / 2**20,
        "ingest_MiBps": size / statistics.median(ing_t) / 2**20,
        "ratio_median": statistics.median(ratios),
        "ratio_of_medians": statistics.median(raw_t) / statistics.median(ing_t),
        "ratios": [round(r, 3) for r in ratios],
        "ingest_serial_median_s": statistics.median(ser_t),
        "ratio_serial_median": statistics.median(r / g for r, g in zip(raw_t, ser_t)),
        "streamed_speedup_median": statistics.median(s_ / g for s_, g in zip(ser_t, ing_t)),
        "ingest_serial_s": [round(t, 4) for t in ser_t],
        "sha256_median_s": statistics.median(sha_t),
        "sha256_MiBps": size / statistics.median(sha_t) / 2**20,
        "ingest_over_sha256_pass": statistics.median(g / h for g, h in zip(ing_t, sha_t)),
        "raw_s": [round(t, 4) for t in raw_t], "ingest_s": [round(t, 4) for t in ing_t],
        "loadavg_before": load_before, "loadavg_after": _loadavg(), "cpus": os.cpu_count(),
    }
    if phases is not None:
        out["server_phases_median_s"] = {k: round(statistics.median(v[warmup:] or v), 4)
                                         for k, v in phases.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--mib", type=int, default=64, help="incident size in MiB (default 64)")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="report server-side phase timings")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(mib=args.mib, reps=args.reps, warmup=args.warmup, profile=args.profile)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"incident: {res['incident_bytes'] / 2**20:.1f} MiB, {res['reps']} reps "
              f"(+{res['warmup']} warm-up), {res['cpus']} CPUs, load {res['loadavg_before']} -> "
              f"{res['loadavg_after']}")
        print(f"raw grpc stream : median {res['raw_median_s'] * 1e3:8.1f} ms "
              f"({res['raw_MiBps']:.0f} MiB/s)")
        print(f"UploadIncident  : median {res['ingest_median_s'] * 1e3:8.1f} ms "
              f"({res['ingest_MiBps']:.0f} MiB/s)")
        print(f"ingest (serial digest, before): median "
              f"{res['ingest_serial_median_s'] * 1e3:8.1f} ms; ratio raw/ingest_serial "
              f"{res['ratio_serial_median']:.3f}; streamed digest speed-up "
              f"{res['streamed_speedup_median']:.2f}x")
        print(f"one sha256 pass : median {res['sha256_median_s'] * 1e3:8.1f} ms "
              f"({res['sha256_MiBps']:.0f} MiB/s); ingest = "
              f"{res['ingest_over_sha256_pass']:.2f} sha256 passes")
        print(f"ratio raw/ingest: median {res['ratio_median']:.3f} (per-rep {res['ratios']}); "
              f"bar >= 0.5")
        if "server_phases_median_s" in res:
            for k, v in res["server_phases_median_s"].items():
                print(f"  server {k:40s} {v * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
