"""Chaos probe: upload bombs, each answered with its status, counted, stored nowhere, cheap in RSS.

Every bomb is one UploadIncident stream (built by the chaos run's one raw-stream builder). For
each: ``forensics_ingest_rejected_total`` is scraped over HTTP before and after (exactly one new
count, of the expected reason), the answer's status and ``forensics-reject-reason`` must be the
expected ones, the id must not be listed afterwards, and the sidecar's peak RSS while it handled
the bomb (VmHWM after resetting it via ``/proc/<pid>/clear_refs``; sampled VmRSS where that is not
permitted) must stay within :data:`RSS_BOUND` of its RSS before the bomb.

The bombs: a zstd decompression bomb (1 GiB of zeros in 34 KB, over the default 512 MiB
``max_decoded_bytes``), a manifest nested 100k deep, an 8 MiB manifest, 200k empty record
batches, one batch of 1M rows, a 2 MiB chunk (over ``max_chunk_bytes``), total_size lying low,
high and far over ``max_incident_bytes``, and 20k empty chunks (over ``max_stream_messages``).

Example::

    rows = probe_bombs(lab, sc, raw_messages)
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

from chaos_lab import (
    Lab,
    MiB,
    Row,
    SidecarProc,
    make_incident,
    proc_status,
    rejected_delta,
    stored_ids,
    upload_answer,
)

#: A bomb may grow the sidecar's RSS by at most this much over its RSS before the bomb (the
#: issue measured +3.2 GiB for one 6.9 KB zstd bomb before decoded sizes were checked).
RSS_BOUND = 256 * MiB
_KiB = 1024


@dataclasses.dataclass(frozen=True)
class Bomb:
    """One hostile upload: how to build its bytes and stream, and the answer it must get."""

    name: str
    attack: str
    build: Callable[[str], bytes]               # incident id -> the bytes sent
    code: str                                   # expected gRPC status name
    reason: str                                 # expected forensics-reject-reason
    stream: dict[str, Any] = dataclasses.field(default_factory=dict)   # raw_messages options


def _arrow(manifest: bytes, batches: Callable[[Any], Iterator[Any]], *,
           compression: str | None = None) -> bytes:
    """An IPC stream of the incident schema with ``manifest`` as its metadata."""
    import pyarrow as pa

    from integrations.incident import MANIFEST_KEY
    from integrations.incident._schema import SCHEMA

    schema = SCHEMA.with_metadata({MANIFEST_KEY: manifest})
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, schema, options=options) as w:
        for batch in batches(schema):
            w.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def _rows(schema: Any, n: int, nbytes: int) -> Any:
    """A batch of ``n`` uint8 activation rows of ``nbytes`` zeros each. The zeros come from
    ``np.zeros`` (calloc: untouched pages), so even a GiB costs this process no memory."""
    import numpy as np
    import pyarrow as pa

    from integrations.incident import ROW_KINDS

    idx = np.zeros(n, dtype=np.int32)
    shape = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)),
                                     pa.array(np.full(n, nbytes, dtype=np.int32)))
    data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [
        None, pa.py_buffer(np.arange(n + 1, dtype=np.int64) * nbytes),
        pa.py_buffer(np.zeros(n * nbytes, dtype=np.uint8))])
    cols = [pa.DictionaryArray.from_arrays((idx + ROW_KINDS.index("activation")).astype(np.int8),
                                           list(ROW_KINDS)),
            pa.DictionaryArray.from_arrays(idx, ["blocks.0.resid_post"]),
            pa.array(["h.0"] * n), pa.array(idx), pa.array(["uint8"] * n),
            shape.cast(schema.field("shape").type), data]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _manifest_of(incident_id: str) -> bytes:
    from integrations.incident import Incident

    data = make_incident(incident_id, tenant="acme", floats=64, seed=11).to_bytes()
    return json.dumps(Incident.from_bytes(data).manifest).encode()


def _with_manifest(incident_id: str, manifest: bytes) -> bytes:
    """A real small incident whose manifest bytes are replaced by ``manifest``."""
    import pyarrow as pa

    from integrations.incident import MANIFEST_KEY

    data = make_incident(incident_id, tenant="acme", floats=64, seed=11).to_bytes()
    table = pa.ipc.open_stream(data).read_all()
    return _arrow(manifest, lambda schema: iter(
        table.replace_schema_metadata({MANIFEST_KEY: manifest}).to_batches()))


def _zstd_bomb(incident_id: str) -> bytes:
    """1 GiB of zeros, zstd-compressed to a few tens of KB (over the default 512 MiB cap)."""
    return _arrow(_manifest_of(incident_id), lambda schema: iter([_rows(schema, 1, 1 << 30)]),
                  compression="zstd")


def _empty_batches(incident_id: str) -> bytes:
    def batches(schema: Any) -> Iterator[Any]:
        empty = _rows(schema, 0, 0)
        for _ in range(200_000):
            yield empty

    return _arrow(_manifest_of(incident_id), batches)


def _million_rows(incident_id: str) -> bytes:
    return _arrow(_manifest_of(incident_id), lambda schema: iter([_rows(schema, 1_000_000, 0)]))


def _plain(floats: int) -> Callable[[str], bytes]:
    return lambda incident_id: bytes(make_incident(incident_id, tenant="acme", floats=floats,
                                                   seed=12).to_bytes())


def _padded(incident_id: str) -> bytes:
    manifest = json.loads(_manifest_of(incident_id))
    manifest["padding"] = "x" * (8 * MiB)
    return _with_manifest(incident_id, json.dumps(manifest).encode())


BOMBS = (
    Bomb("zstd_bomb", "zstd bomb: 1 GiB of zeros compressed", _zstd_bomb,
         "RESOURCE_EXHAUSTED", "decoded_too_large"),
    Bomb("nested_manifest", "manifest JSON nested 100k deep",
         lambda i: _with_manifest(i, b"[" * 100_000 + b"]" * 100_000),
         "INVALID_ARGUMENT", "invalid_incident"),
    Bomb("huge_manifest", "8 MiB manifest", _padded, "RESOURCE_EXHAUSTED", "decoded_too_large"),
    Bomb("empty_batches", "200k empty record batches", _empty_batches,
         "RESOURCE_EXHAUSTED", "decoded_too_large", {"chunk_size": MiB}),
    Bomb("million_rows", "one record batch of 1M rows", _million_rows,
         "RESOURCE_EXHAUSTED", "decoded_too_large", {"chunk_size": MiB}),
    Bomb("oversize_chunk", "one 2 MiB chunk (max_chunk_bytes 1 MiB)", _plain(768 * 1024),
         "RESOURCE_EXHAUSTED", "chunk_too_large", {"chunk_size": 2 * MiB}),
    Bomb("size_lies_low", "header total_size = half the bytes sent", _plain(4096),
         "INVALID_ARGUMENT", "size_mismatch", {"declare_size": "half"}),
    Bomb("size_lies_high", "header total_size = twice the bytes sent", _plain(4096),
         "INVALID_ARGUMENT", "size_mismatch", {"declare_size": "double"}),
    Bomb("size_over_cap", "header total_size = 1 TiB", _plain(4096),
         "RESOURCE_EXHAUSTED", "too_large", {"declare_size": 1 << 40}),
    Bomb("endless_chunks", "20k empty chunks after the header", _plain(64),
         "RESOURCE_EXHAUSTED", "too_many_messages", {"empty_chunks": 20_000}),
)


class _Sampler:
    """VmRSS of ``pid`` sampled every 5 ms on a thread (the fallback when VmHWM can't be reset)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, proc_status(self.pid)["VmRSS"])

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _stream_options(bomb: Bomb, size: int) -> dict[str, Any]:
    opts = dict(bomb.stream)
    lie = opts.get("declare_size")
    if lie in ("half", "double"):
        opts["declare_size"] = size // 2 if lie == "half" else size * 2
    return opts


def _fire(lab: Lab, sc: SidecarProc, raw: Callable[..., Any], bomb: Bomb) -> Row:
    incident_id = f"bomb-{bomb.name.replace('_', '-')}"
    data = bomb.build(incident_id)
    messages = raw(incident_id, data, **_stream_options(bomb, len(data)))
    before, rss0 = sc.rejected(), sc.rss()
    hwm = sc.reset_peak()
    with lab.client(sc, "acme") as c, _Sampler(sc.pid) as sampled:
        answer = upload_answer(c, messages)
    peak = sc.peak() if hwm else sampled.peak
    delta = rejected_delta(before, sc.rejected())
    stored = incident_id in stored_ids(lab, sc, "acme")
    growth = max(0, peak - rss0)
    ok = (answer.code == bomb.code and answer.reason == bomb.reason
          and delta == {bomb.reason: 1} and not stored and growth <= RSS_BOUND)
    figures = {"sent_bytes": len(data), "answer": str(answer), "details": answer.details[:200],
               "counted": delta, "stored": stored, "rss_before_mib": round(rss0 / MiB, 1),
               "rss_peak_mib": round(peak / MiB, 1), "rss_growth_mib": round(growth / MiB, 1),
               "peak_from": "VmHWM" if hwm else "sampled VmRSS"}
    return Row("bomb", f"{bomb.attack} ({len(data) / _KiB:,.0f} KiB sent)",
               f"{bomb.code} {bomb.reason}, counted once, not stored, RSS +<= "
               f"{RSS_BOUND // MiB} MiB",
               f"{answer}, counted {delta}, stored {stored}, RSS {rss0 / MiB:.0f} -> peak "
               f"{peak / MiB:.0f} MiB (+{growth / MiB:.0f})", ok, figures)


def probe_bombs(lab: Lab, sc: SidecarProc, raw: Callable[..., Any]) -> list[Row]:
    """Every bomb of :data:`BOMBS` against ``sc`` (module doc); one row each."""
    return [_fire(lab, sc, raw, bomb) for bomb in BOMBS]
