"""Sending for :class:`~integrations.exporters.SidecarExporter`: one upload, backoff, the drain.

One attempt streams header, <= 1 MiB chunks and a trailer whose sha256 is computed while the
chunks are sent, and classifies the outcome (acked / unreachable-retryable / rejected).

A background thread re-sends spooled incidents oldest first, deleting each file only after the
sidecar acknowledged it. ``UNAVAILABLE`` (sidecar down) is retried without limit with
exponential backoff and full jitter (the backoff grows, nothing is dropped); the bounded-retry
codes (``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``, ``UNKNOWN``, ``INTERNAL``, ``ABORTED``)
get ``max_retries`` attempts per entry, then the entry is dropped and counted, so one poison
incident never blocks the spool; any other code drops it at once (counted). Only one process
drains a spool directory at a time (a lock file), so serving workers may share one.

:class:`SpoolDrain` is a mixin: the exporter provides the upload attempt, backoff, counters and
the per-process locks/events it uses.

Example::

    class SidecarExporter(SpoolDrain):
        ...
    ex._ensure_drain()          # start (or restart after fork) the drain thread
    ex.force_flush(timeout_s=10)  # wait until the spool is empty
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from ._spool import DiskSpool, SpoolEntry

__all__ = ["RETRYABLE", "SpoolDrain"]

_log = logging.getLogger("integrations.exporters._sidecar")

#: Codes worth retrying (uploads are idempotent, so a retry is always safe). UNAVAILABLE means
#: "not reachable now" (retried without limit from the spool); the others are retried
#: ``max_retries`` times per incident. UNKNOWN / INTERNAL / ABORTED are what a connection torn
#: down mid-stream (a sidecar killed during an upload) can surface as.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN,
                       grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED})
_MANIFEST_KEY = b"forensics.manifest"
_CHUNK = 1024 * 1024  # sidecar.api.v1.MAX_CHUNK_BYTES (kept literal: no import cost here)


class _Outcome(enum.Enum):
    ACKED = "acked"
    UNREACHABLE = "unreachable"  # retryable code still failing: spool (or drop without spool)
    REJECTED = "rejected"        # non-retryable: drop


@dataclass
class _Attempt:
    outcome: _Outcome
    code: grpc.StatusCode | None = None
    detail: str = ""


def _manifest_from_arrow(data: bytes) -> dict[str, Any] | None:
    """The manifest from the Arrow stream's schema metadata (reads the schema message only)."""
    try:
        import pyarrow as pa

        schema = pa.ipc.open_stream(pa.py_buffer(data)).schema
        meta = schema.metadata or {}
        m = json.loads(meta[_MANIFEST_KEY])
        return m if isinstance(m, dict) else None
    except Exception:
        return None


def _request_traceparent(manifest: Mapping[str, Any] | None) -> str:
    """The request's W3C traceparent from a manifest ("" when absent)."""
    req = (manifest or {}).get("request")
    tp = req.get("traceparent") if isinstance(req, Mapping) else None
    return tp if isinstance(tp, str) else ""


def _fmt(res: _Attempt) -> str:
    name = res.code.name if res.code is not None else "error"
    return f"{name}: {res.detail}" if res.detail else name


class SpoolDrain:
    """Mixin: one upload attempt, backoff, the spool drain thread and ``force_flush``."""

    _spool: DiskSpool | None
    _closed: bool
    _pid: int
    _lock: threading.Lock
    _cond: threading.Condition
    _wake: threading.Event
    _stop: threading.Event
    _drain_thread: threading.Thread | None
    _draining: bool
    max_retries: int

    deadline_s: float
    backoff_initial_s: float
    backoff_max_s: float
    _rng: random.Random

    if TYPE_CHECKING:  # provided by the exporter
        def _reset_after_fork(self) -> None: ...

        def _get_stub(self) -> Any: ...

        def _metadata(self) -> list[tuple[str, str]]: ...

        def _count(self, key: str, n: float = 1) -> None: ...

        def _drop(self, reason: str, incident_id: str, why: str) -> None: ...

        def _update_spool_gauge(self) -> None: ...

    def _upload_once(self, incident_id: str, data: bytes, traceparent: str = "") -> _Attempt:
        """One UploadIncident call. ``traceparent`` (the request's, from the manifest) goes in
        the header so the sidecar's ``ingest`` span links to the request trace."""
        from sidecar.api.v1 import incidents_pb2 as pb

        hasher = hashlib.sha256()  # fed chunk by chunk as they are sent (no extra pass)

        def parts() -> Iterator[Any]:
            yield pb.UploadIncidentRequest(header=pb.UploadHeader(
                incident_id=incident_id, total_size=len(data), traceparent=traceparent))
            view = memoryview(data)
            for off in range(0, len(data), _CHUNK):
                chunk = view[off:off + _CHUNK]
                hasher.update(chunk)
                yield pb.UploadIncidentRequest(chunk=pb.Chunk(data=bytes(chunk)))
            yield pb.UploadIncidentRequest(trailer=pb.UploadTrailer(sha256=hasher.hexdigest()))

        try:
            stub = self._get_stub()
            resp = stub.UploadIncident(parts(), timeout=self.deadline_s,
                                       metadata=self._metadata())
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            detail = (e.details() if hasattr(e, "details") else str(e)) or ""
            kind = _Outcome.UNREACHABLE if code in RETRYABLE else _Outcome.REJECTED
            return _Attempt(kind, code, detail)
        except Exception as e:  # bad credentials file, ...: not something retrying fixes
            return _Attempt(_Outcome.REJECTED, None, f"{type(e).__name__}: {e}")
        sha = hasher.hexdigest()
        if resp.sha256 and resp.sha256 != sha:
            return _Attempt(_Outcome.REJECTED, grpc.StatusCode.DATA_LOSS,
                            f"sidecar acknowledged sha256 {resp.sha256}, sent {sha}")
        return _Attempt(_Outcome.ACKED)

    def _backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff for retry number ``attempt`` (0-based)."""
        cap = min(self.backoff_max_s, self.backoff_initial_s * (2 ** min(attempt, 30)))
        return self._rng.uniform(0.0, cap)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True if stopped."""
        self._count("backoff_s", seconds)
        return self._stop.wait(seconds)

    def _ensure_drain(self) -> None:
        if self._spool is None or self._closed:
            return
        if os.getpid() != self._pid:
            self._reset_after_fork()
        with self._lock:
            t = self._drain_thread
            if t is not None and t.is_alive():
                return
            t = threading.Thread(target=self._drain_loop, name="forensics-spool-drain",
                                 daemon=True)
            self._drain_thread = t
        t.start()

    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_until_stopped()
                return
            except Exception:  # never let the drain die silently: log, pause, go on
                _log.exception("SidecarExporter: spool drain failed; retrying in 1 s")
                if self._stop.wait(1.0):
                    return

    def _drain_until_stopped(self) -> None:
        spool = self._spool
        assert spool is not None
        unreachable = 0  # consecutive UNAVAILABLE (sidecar down): backoff grows, never drops
        busy: dict[Path, int] = {}  # failed attempts per entry with a bounded-retry code
        try:
            while not self._stop.is_set():
                if not spool.try_acquire_drain_lock():  # another process drains this spool
                    self._stop.wait(1.0)
                    continue
                entries = spool.entries()
                if not entries:
                    spool.rescan()
                    self._update_spool_gauge()
                    with self._cond:
                        self._cond.notify_all()
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                for head in entries:  # oldest first; new entries sort after these
                    if self._stop.is_set():
                        return
                    with self._lock:
                        self._draining = True
                    try:
                        state = self._drain_one(head, busy)
                    finally:
                        with self._lock:
                            self._draining = False
                        self._update_spool_gauge()
                        with self._cond:
                            self._cond.notify_all()
                    if state == "unreachable":
                        unreachable += 1
                        self._sleep(self._backoff(unreachable - 1))
                        break  # then retry the same head
                    unreachable = 0
                    if state == "busy":
                        self._sleep(self._backoff(busy.get(head.path, 1) - 1))
                        break
        finally:
            spool.release_drain_lock()

    def _drain_one(self, head: SpoolEntry, busy: dict[Path, int]) -> str:
        """Send the oldest entry once: "done" (acked or dropped, file removed), "unreachable"
        (sidecar down; keep it) or "busy" (bounded-retry code; keep it, counted in ``busy``)."""
        spool = self._spool
        assert spool is not None
        try:
            data = head.read()
        except FileNotFoundError:  # another process sharing the spool sent it
            busy.pop(head.path, None)
            return "done"
        manifest = _manifest_from_arrow(data)
        incident_id = str((manifest or {}).get("id") or head.incident_id)
        res = self._upload_once(incident_id, data, _request_traceparent(manifest))
        if res.outcome is _Outcome.ACKED:
            spool.remove(head)  # only now: the sidecar holds it durably
            self._count("drained")
        elif res.outcome is _Outcome.REJECTED:
            spool.remove(head)
            self._drop("export_failed", incident_id,
                       f"sidecar rejected the spooled incident: {_fmt(res)} (not retried)")
        elif res.code == grpc.StatusCode.UNAVAILABLE:
            return "unreachable"
        else:
            n = busy.get(head.path, 0) + 1
            if n <= self.max_retries:
                busy[head.path] = n
                self._count("retries")
                return "busy"
            spool.remove(head)
            self._drop("export_failed", incident_id,
                       f"{_fmt(res)} after {n} attempts from the spool")
        busy.pop(head.path, None)
        return "done"

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until the spool is empty (everything acknowledged or dropped); False on timeout.

        ``export`` itself is synchronous, so nothing else is ever in flight."""
        if self._spool is None:
            return True
        self._ensure_drain()
        self._wake.set()
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while True:
                if not self._draining and self._spool.is_empty():
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
