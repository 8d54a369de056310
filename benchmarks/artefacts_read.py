"""What reading a baseline/probe through the store seam costs a job (``sidecar._artefacts``).

The object is RANDOM BYTES of the given size standing in for a baseline file (the read path
never looks inside: it checks the sha256 the catalog row carries, then hands the bytes to the
parser, which this does not time). Per store and size: ``put`` (write, durable), the FIRST
checked read of a reader with an empty cache (local store: hash the file; shared store: fetch
into the bounded reference cache, then hash) and a REPEATED read (the digest is memoized per
file state; what every later ``cf`` job pays). Stores: the local ``data_dir``; a ``file://``
directory standing in for shared storage; with ``--s3``, moto's S3 API EMULATOR in a child
process on 127.0.0.1 (NOT AWS S3: it shows what the code adds on this machine, not S3's
latency). Median of ``--reps``.

Example::

    OMP_NUM_THREADS=1 python benchmarks/artefacts_read.py --sizes 1 16 64 --reps 5 --s3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def _one(store: dict[str, Any], data: bytes, tmp: Path) -> tuple[float, float, float]:
    """(put, first read, repeated read) in ms for one fresh writer and one fresh reader."""
    from sidecar._artefacts import artefact_path, artefact_ref, put_artefact
    from sidecar._config import SidecarConfig

    def config(name: str) -> SidecarConfig:
        (tmp / name).mkdir(parents=True, exist_ok=True)
        return SidecarConfig.from_dict({"data_dir": str(tmp / name), "store": store})

    writer = config("writer")
    rel = f"baselines/tenant-bench/fp/norm-v0001-{uuid.uuid4().hex[:12]}.npz"
    sha: list[str] = []
    put = _timed(lambda: sha.append(put_artefact(writer, rel, data)))
    ref = artefact_ref({"path": rel, "sha256": sha[0], "version": 1}, what="baseline")
    reader = writer if not store.get("uri") else config(f"reader-{uuid.uuid4().hex[:6]}")
    first = _timed(lambda: artefact_path(reader, ref))
    again = _timed(lambda: artefact_path(reader, ref))
    return put, first, again


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64], help="MiB")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--s3", action="store_true", help="also the S3 API emulator (moto)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="forensics-artefacts-"))
    stores: dict[str, dict[str, Any]] = {"local data_dir": {},
                                         "file:// store": {"uri": f"file://{tmp / 'shared'}"}}
    proc = None
    if args.s3:
        from benchmarks.store_s3_emulator import _emulator

        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_EC2_METADATA_DISABLED="true")
        port = 45000 + os.getpid() % 1000
        proc = _emulator(port)
        stores["S3 API emulator"] = {"uri": "s3://bench/artefacts", "s3": {
            "endpoint_override": f"127.0.0.1:{port}", "scheme": "http", "region": "us-east-1"}}
    try:
        print(f"{'store':<16} {'MiB':>4} {'put ms':>8} {'1st read ms':>12} {'repeat ms':>10}")
        for name, store in stores.items():
            for mib in args.sizes:
                data = os.urandom(mib << 20)
                runs = [_one(store, data, tmp / uuid.uuid4().hex[:8]) for _ in range(args.reps)]
                put, first, again = (statistics.median(r[i] for r in runs) for i in range(3))
                print(f"{name:<16} {mib:>4} {put:>8.1f} {first:>12.1f} {again:>10.2f}")
    finally:
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()
