"""Ack latency and upload throughput: incident files in ``data_dir`` vs on an S3 API EMULATOR.

NOT AWS S3: the object store is moto's S3 emulator (``python -m moto.server``) in a child
process on 127.0.0.1, so the numbers show what the ``store.uri`` path adds on this machine (two
PUTs per incident, a list at start-up), not S3's latency. The sidecar runs in this process,
real gRPC on 127.0.0.1, small real incidents (``tests.integration.conftest.build_incident``).

Per repetition and mode: ``--n`` sequential uploads (ack latency: median, p90), ``--n`` uploads
from 4 threads (throughput), 10 downloads, and opening a fresh sidecar whose index is rebuilt
from the files (for the emulator: listed and fetched from the bucket). Modes rotate each
repetition. ``--global-lock`` also times the emulator with every upload behind one store lock
(what ``LocalStore`` did before ``KeyLocks``), to show what per-key locking buys.

Example::

    OMP_NUM_THREADS=1 python benchmarks/store_s3_emulator.py --n 30 --reps 3 --global-lock
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.getcwd())


def _emulator(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                           region="us-east-1", allow_bucket_creation=True)
    for _ in range(100):
        with contextlib.suppress(OSError):
            fs.create_dir("bench")
            return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the S3 API emulator (moto.server) did not start")


def _run(store: dict[str, Any], blobs: list[bytes]) -> dict[str, float]:
    from sidecar._client import SidecarClient
    from sidecar._config import SidecarConfig
    from sidecar._server import create_server

    tmp, n = tempfile.mkdtemp(prefix="forensics-s3bench-"), len(blobs) // 2
    raw = {"data_dir": f"{tmp}/data", "store": store, "modules": {"cf": {"enabled": False}}}
    sc, port = create_server(SidecarConfig.from_dict(raw), port=0)
    sc.start()
    with SidecarClient(f"127.0.0.1:{port}") as c:
        lat = []
        for i in range(n):
            t = time.perf_counter()
            c.upload(f"inc-{i}", blobs[i])
            lat.append(time.perf_counter() - t)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda i: c.upload(f"inc-{i}", blobs[i]), range(n, 2 * n)))
        parallel = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(10):
            c.download(f"inc-{i}")
        download = (time.perf_counter() - t0) / 10
    sc.stop(grace=0.5)
    for name in os.listdir(f"{tmp}/data"):   # drop the index: rebuilt from the files
        if name.startswith("index.duckdb"):
            os.rename(f"{tmp}/data/{name}", f"{tmp}/old-{name}")
    t0 = time.perf_counter()
    fresh, _ = create_server(SidecarConfig.from_dict(raw), port=0)
    rebuild = time.perf_counter() - t0
    assert len(fresh.store.index.incident_ids()) == 2 * n
    fresh.stop(grace=0.1)
    return {"ack_median_ms": statistics.median(lat) * 1e3,
            "ack_p90_ms": sorted(lat)[int(0.9 * len(lat))] * 1e3,
            "uploads_per_s_4_threads": n / parallel, "download_ms": download * 1e3,
            "rebuild_index_s": rebuild}


@contextlib.contextmanager
def _one_global_lock() -> Iterator[None]:
    from sidecar._store_files import KeyLocks

    per_key, lock = KeyLocks.hold, threading.Lock()

    @contextlib.contextmanager
    def hold(self: Any, key: Any) -> Iterator[None]:
        with lock:
            yield

    KeyLocks.hold = hold  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        KeyLocks.hold = per_key  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=30, help="uploads per phase")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--global-lock", action="store_true")
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="emulator", AWS_SECRET_ACCESS_KEY="emulator",
                      AWS_EC2_METADATA_DISABLED="true")
    from tests.integration.conftest import build_incident, free_port

    blobs = [build_incident(f"inc-{i}", n_sites=64, seed=i) for i in range(2 * args.n)]
    port = free_port()
    proc = _emulator(port)
    s3 = {"endpoint_override": f"127.0.0.1:{port}", "scheme": "http", "region": "us-east-1"}
    modes = ["local data_dir", "S3 emulator"] + (["S3 emulator, one lock"]
                                                 if args.global_lock else [])
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    try:
        for rep in range(args.reps):
            for mode in modes[rep % len(modes):] + modes[:rep % len(modes)]:
                store = {} if mode.startswith("local") else \
                    {"uri": f"s3://bench/{uuid.uuid4().hex[:8]}", "s3": s3}
                ctx = _one_global_lock() if "one lock" in mode else contextlib.nullcontext()
                with ctx:
                    results[mode].append(_run(store, blobs))
    finally:
        proc.kill()
    print(f"{2 * args.n} incidents of {len(blobs[0])} bytes per mode, {args.reps} repetitions "
          "(medians over repetitions); S3 = moto emulator, not AWS")
    for mode, runs in results.items():
        cells = ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0])
        print(f"  {mode}: {cells}")


if __name__ == "__main__":
    main()
