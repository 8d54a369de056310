"""The spool drainer: re-sends spooled incidents, oldest first, on its own thread.

Each spool file is deleted only after the sidecar acknowledged it. ``UNAVAILABLE`` (sidecar
down) is retried without limit with exponential backoff and full jitter (the backoff grows,
nothing is dropped). After a bounded-retry code (``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``,
``UNKNOWN``, ``INTERNAL``, ``ABORTED``) the drainer asks ``responsive()`` (a short health check):
a sidecar that does not answer either (hung, e.g. SIGSTOPped, or gone) is treated like
``UNAVAILABLE`` — waited for, never counted against the entry; one that answers gets the entry
``max_retries`` more attempts, then the entry is dropped and counted, so one poison incident
never blocks the spool. Any other code drops the entry at once (counted). Once stopped, an
attempt that was not acknowledged (its owner cancels the upload in flight at shutdown) keeps its
entry, whatever its code: it is sent by the next drainer. Only one process drains a spool directory at a time (a lock file), so serving
workers may share one.

A drainer belongs to one process: after ``fork`` its owner makes a new one.

Example::

    drainer = SpoolDrainer(spool, upload=client.attempt, backoff=backoff, tally=tally,
                           max_retries=5, responsive=lambda: client.responsive(1.0))
    drainer.start()                 # idempotent
    drainer.wake()                  # something was just spooled
    drainer.wait_empty(10.0)        # True once the spool is empty
    drainer.stop(join_timeout_s=5)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from ._retry import Backoff
from ._spool import DiskSpool, SpoolEntry
from ._tally import ExportTally
from ._upload import Attempt, Outcome, manifest_from_arrow, request_traceparent

__all__ = ["SpoolDrainer"]

_log = logging.getLogger("integrations.exporters._sidecar")  # the SidecarExporter's log

#: ``upload(incident_id, data, traceparent) -> Attempt``
_Upload = Callable[[str, bytes, str], Attempt]
#: ``responsive() -> bool``: does the sidecar answer at all (a short health check)?
_Responsive = Callable[[], bool]


class SpoolDrainer:
    """Drains one :class:`DiskSpool` through ``upload`` (see the module doc)."""

    def __init__(self, spool: DiskSpool, *, upload: _Upload, backoff: Backoff,
                 tally: ExportTally, max_retries: int,
                 responsive: _Responsive | None = None) -> None:
        self._spool = spool
        self._responsive = responsive
        self._upload = upload
        self._backoff = backoff
        self._tally = tally
        self._max_retries = max_retries
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._draining = False  # an entry is being sent right now

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        """Run the drain thread (no-op while it runs, or once stopped)."""
        if self._stop.is_set():
            return
        with self._lock:
            t = self._thread
            if t is not None and t.is_alive():
                return
            t = threading.Thread(target=self._loop, name="forensics-spool-drain", daemon=True)
            self._thread = t
        t.start()

    def wake(self) -> None:
        """Look at the spool now (an entry was added)."""
        self._wake.set()

    def wait_empty(self, timeout_s: float) -> bool:
        """Wait until the spool is empty and nothing is being sent; False on timeout."""
        self.start()
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

    def stop(self, *, join_timeout_s: float) -> None:
        """Stop the thread (what is spooled stays on disk); idempotent."""
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=join_timeout_s)

    # ------------------------------------------------------------------ thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_until_stopped()
                return
            except Exception:  # never let the drain die silently: log, pause, go on
                _log.exception("SidecarExporter: spool drain failed; retrying in 1 s")
                if self._stop.wait(1.0):
                    return

    def _notify(self) -> None:
        self._tally.update_spool_gauge()
        with self._cond:
            self._cond.notify_all()

    def _drain_until_stopped(self) -> None:
        spool = self._spool
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
                    self._notify()
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                unreachable = self._pass(entries, busy, unreachable)
        finally:
            spool.release_drain_lock()

    def _pass(self, entries: list[SpoolEntry], busy: dict[Path, int], unreachable: int) -> int:
        """Send ``entries`` oldest first until one must wait; returns the new count of
        consecutive unreachable attempts."""
        for head in entries:  # new entries sort after these
            if self._stop.is_set():
                return unreachable
            with self._lock:
                self._draining = True
            try:
                state = self._send(head, busy)
            finally:
                with self._lock:
                    self._draining = False
                self._notify()
            if state == "unreachable":
                self._backoff.sleep(unreachable, self._stop)
                return unreachable + 1  # then retry the same head
            unreachable = 0
            if state == "busy":
                self._backoff.sleep(busy.get(head.path, 1) - 1, self._stop)
                return unreachable
        return unreachable

    def _answers(self) -> bool:
        """After a bounded-retry code: whether the sidecar answers a health check (no probe
        configured: assume it does, and count the failure against the entry)."""
        return self._responsive is None or self._responsive()

    def _send(self, head: SpoolEntry, busy: dict[Path, int]) -> str:
        """Send the oldest entry once: "done" (acked or dropped, file removed), "unreachable"
        (sidecar down; keep it) or "busy" (bounded-retry code; keep it, counted in ``busy``)."""
        try:
            data = head.read()
        except FileNotFoundError:  # another process sharing the spool sent it
            busy.pop(head.path, None)
            return "done"
        manifest = manifest_from_arrow(data)
        incident_id = str((manifest or {}).get("id") or head.incident_id)
        res = self._upload(incident_id, data, request_traceparent(manifest))
        if self._stop.is_set() and res.outcome is not Outcome.ACKED:
            return "unreachable"  # stopping (the upload was cancelled): keep it for next time
        if res.outcome is Outcome.ACKED:
            self._spool.remove(head)  # only now: the sidecar holds it durably
            self._tally.count("drained")
        elif res.outcome is Outcome.REJECTED:
            self._spool.remove(head)
            self._tally.drop("export_failed", incident_id,
                             f"sidecar rejected the spooled incident: {res} (not retried)")
        elif res.code == grpc.StatusCode.UNAVAILABLE or not self._answers():
            return "unreachable"  # down or hung: wait for it, never count it against the entry
        else:
            n = busy.get(head.path, 0) + 1
            if n <= self._max_retries:
                busy[head.path] = n
                self._tally.count("retries")
                return "busy"
            self._spool.remove(head)
            self._tally.drop("export_failed", incident_id,
                             f"{res} after {n} attempts from the spool")
        busy.pop(head.path, None)
        return "done"
