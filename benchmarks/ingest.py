"""Sidecar ingest vs raw gRPC streaming of the same bytes, as a ratio in one interleaved run.

Modes on the same 64 MiB incidents (real ones, built with ``IncidentBuilder``):

* ``raw``    — grpcio client-streaming of the incident's bytes in 1 MiB chunks to a trivial
               servicer (a generic stream-unary handler with identity (de)serialisers) that
               consumes the chunks and answers with their count. No checks, no disk.
* ``durable_floor`` — the same raw stream to a servicer that also writes every chunk to a temp
               file as it arrives and fsyncs it before answering: raw gRPC + write + fsync of
               the same bytes, what any durable ingest must at least cost.
* ``ingest`` — ``forensics.v1.IncidentService/UploadIncident`` end to end through the real
               client (``integrations.exporters.SidecarExporter``), CRC32C protocol (DESIGN
               §10): chunk and stream CRC32C checked as the bytes arrive, chunks written to the
               temp file as they arrive, fsync, Arrow validation (structure, schema, decoded
               size), rename, directory fsync, DuckDB index row, then the ack. The content
               digest (rows' sha256) is checked after the ack, outside the timed region; its
               time is reported (``--profile``) and the benchmark waits for it before the next
               repetition so it never overlaps a timed upload.
* ``ingest_sha256`` — (reference) the older clients' protocol on the same sidecar: trailer
               sha256 over every byte and the rows' digest verified before the ack
               (``sidecar.SidecarClient.upload(..., content_sha256=None)``).
* ``sha256`` — (reference) one ``hashlib.sha256`` pass over the same bytes in this process.

The servers run in ONE child process (the sidecar is its own process in production, and client
and server must not share a GIL); the client is this process. Every repetition runs every mode
on a fresh incident id, rotating which goes first, so drift and machine noise hit all alike.
Reported: per-mode medians and the median of the per-repetition ratios ``raw_time /
ingest_time`` (= ingest throughput / raw throughput; the bar is >= 0.5), and the same ratio for
the durable floor. Stored incidents are deleted after each repetition (outside the timed region).

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
DURABLE_METHOD = "/bench.Raw/UploadDurable"
MODES = ("raw", "durable_floor", "ingest", "ingest_sha256")


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

    def consume_durable(request_iterator: Iterator[bytes], context: Any) -> bytes:
        n = 0
        fd, path = tempfile.mkstemp(dir=data_dir, prefix=".floor-")
        try:
            for chunk in request_iterator:
                n += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(path)
        return str(n).encode()

    raw = grpc.server(cf.ThreadPoolExecutor(max_workers=4),
                      options=[("grpc.max_receive_message_length", CHUNK + 65536)])
    raw.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Raw", {
        "Upload": grpc.stream_unary_rpc_method_handler(consume),
        "UploadDurable": grpc.stream_unary_rpc_method_handler(consume_durable)}),))
    raw_port = raw.add_insecure_port("127.0.0.1:0")
    raw.start()

    phases: dict[str, list[float]] = {}
    if profile:
        _instrument(phases)
    cfg = SidecarConfig.from_dict({"data_dir": f"{data_dir}/sidecar",
                                   "metrics": {"enabled": False},
                                   "modules": {"cf": {"enabled": False}}})
    sc, _ = create_server(cfg, port=0)
    sc.start()
    servers = [sc]
    conn.send((raw_port, sc.port))
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
                if not sc.store.verifier.wait_idle(300):
                    raise RuntimeError("post-ack verification did not finish in 300 s")
                row = sc.store.get(msg[1])
                state = row.integrity if row is not None else "absent"
                sc.store.delete(msg[1])
            conn.send(state)
    for sc in servers:
        sc.stop(grace=1.0)
    raw.stop(1.0)


def _instrument(phases: dict[str, list[float]]) -> None:
    """Wrap the store's ingest steps with timers (``--profile`` only)."""
    import functools

    from integrations.incident import Incident
    from sidecar import _store, _store_files, _store_verify

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
    _store_verify.ContentVerifier.verify = timed(  # type: ignore[method-assign]
        "post-ack verify (rows digest + file sha256)", _store_verify.ContentVerifier.verify)
    orig_open = Incident.open.__func__  # type: ignore[attr-defined]
    Incident.open = classmethod(  # type: ignore[method-assign,assignment]
        timed("Incident.open (validate+digest)", orig_open))


# ---------------------------------------------------------------------------- client side
def _raw_upload(channel: Any, data: bytes, method: str = RAW_METHOD) -> float:
    call = channel.stream_unary(method)

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


def _old_client_upload(client: Any, incident_id: str, data: bytes) -> float:
    """The sha256 protocol of clients before the CRC32C one (trailer sha256 while sending)."""
    t0 = time.perf_counter()
    resp = client.upload(incident_id, data, content_sha256=None)
    dt = time.perf_counter() - t0
    if not resp.created or resp.size != len(data):
        raise RuntimeError(f"UploadIncident (sha256 protocol) failed: {resp}")
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
    from sidecar import SidecarClient

    t_build = time.perf_counter()
    incidents = build_incidents(reps + warmup, mib=mib)
    build_s = time.perf_counter() - t_build
    sizes = [len(d) for d in incidents]
    ctx = mp.get_context("spawn")
    times: dict[str, list[float]] = {m: [] for m in (*MODES, "sha256")}
    states: list[str] = []
    with tempfile.TemporaryDirectory(prefix="forensics-ingest-bench-") as data_dir:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(data_dir, child, profile), daemon=True)
        proc.start()
        raw_port, port = parent.recv()
        channel = grpc.insecure_channel(f"127.0.0.1:{raw_port}", options=[
            ("grpc.max_send_message_length", 4 * CHUNK)])
        exporter = SidecarExporter(f"127.0.0.1:{port}", deadline_s=300.0, max_retries=0)
        old = SidecarClient(f"127.0.0.1:{port}", timeout_s=300.0)
        load_before = _loadavg()
        try:
            for i, data in enumerate(incidents):
                order = MODES[i % len(MODES):] + MODES[:i % len(MODES)]   # each leads in turn
                rep = {"sha256": _sha256_pass(data)}
                for mode in order:
                    if mode == "ingest":
                        rep[mode] = _ingest_upload(exporter, data)
                        parent.send(("delete", f"bench-{os.getpid()}-{i}"))
                        states.append(parent.recv())
                    elif mode == "ingest_sha256":
                        rep[mode] = _old_client_upload(old, f"bench-{os.getpid()}-{i}", data)
                        parent.send(("delete", f"bench-{os.getpid()}-{i}"))
                        parent.recv()
                    else:
                        rep[mode] = _raw_upload(channel, data, RAW_METHOD if mode == "raw"
                                                else DURABLE_METHOD)
                if i >= warmup:
                    for k, v in rep.items():
                        times[k].append(v)
            phases = None
            if profile:
                parent.send("phases")
                phases = parent.recv()
        finally:
            exporter.shutdown(timeout_s=1.0)
            old.close()
            channel.close()
            parent.send("stop")
            proc.join(10)
    raw_t, ing_t = times["raw"], times["ingest"]
    size = statistics.median(sizes)

    def ratio(mode: str) -> float:
        return statistics.median(r / g for r, g in zip(raw_t, times[mode]))

    out: dict[str, Any] = {
        "incident_bytes": int(size), "reps": reps, "warmup": warmup,
        "build_s": round(build_s, 2),
        **{f"{m}_median_s": statistics.median(times[m]) for m in (*MODES, "sha256")},
        **{f"{m}_MiBps": size / statistics.median(times[m]) / 2**20 for m in (*MODES, "sha256")},
        "ratio_median": ratio("ingest"),
        "ratio_of_medians": statistics.median(raw_t) / statistics.median(ing_t),
        "ratios": [round(r / g, 3) for r, g in zip(raw_t, ing_t)],
        "ratio_durable_floor_median": ratio("durable_floor"),
        "ratio_sha256_protocol_median": ratio("ingest_sha256"),
        "ingest_over_durable_floor": statistics.median(
            g / f for g, f in zip(ing_t, times["durable_floor"])),
        "post_ack_states": sorted(set(states)),
        **{f"{m}_s": [round(t, 4) for t in times[m]] for m in MODES},
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
        for mode, label in (("raw", "raw grpc stream"), ("durable_floor", "raw + write + fsync"),
                            ("ingest", "UploadIncident (CRC32C)"),
                            ("ingest_sha256", "UploadIncident (sha256, old)"),
                            ("sha256", "one sha256 pass")):
            print(f"{label:30s}: median {res[mode + '_median_s'] * 1e3:8.1f} ms "
                  f"({res[mode + '_MiBps']:.0f} MiB/s)")
        print(f"ratio raw/ingest: median {res['ratio_median']:.3f} (per-rep {res['ratios']}); "
              f"bar >= 0.5")
        print(f"ratio raw/durable floor {res['ratio_durable_floor_median']:.3f}; raw/ingest with "
              f"the old sha256 protocol {res['ratio_sha256_protocol_median']:.3f}; ingest = "
              f"{res['ingest_over_durable_floor']:.2f}x the durable floor; post-ack states "
              f"{res['post_ack_states']}")
        if "server_phases_median_s" in res:
            for k, v in res["server_phases_median_s"].items():
                print(f"  server {k:40s} {v * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
