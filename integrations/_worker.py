"""The export worker: a bounded queue drained by one background thread (OpenTelemetry's
``BatchSpanProcessor`` shape).

The worker is given an exporter, the metrics and a build function; it knows nothing about
recorders. The serving thread only ever calls :meth:`ExportWorker.submit` (``put_nowait``; a
full queue is a counted drop, never a wait). The worker thread calls ``build(item)`` to make the
Arrow incident and hands it to the exporter. Every submitted item ends as exported or
dropped-with-reason: ``queue_full`` (submit), ``too_large`` (build raised
:class:`~integrations.errors.IncidentTooLargeError`), ``capture_error`` (build raised anything
else), ``export_failed`` (the exporter returned FAILURE and did not count it itself),
``shutdown`` (still queued when :meth:`stop` gave up).

Example::

    w = ExportWorker(exporter=ex, metrics=RecorderMetrics(registry=reg), build=factory,
                     max_queue=64)
    w.start()
    w.submit("inc-1", pending)       # -> "inc-1", or None when dropped (counted)
    w.flush(timeout_s=5); w.stop(timeout_s=5)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import IncidentTooLargeError
from .exporters import ExportResult

if TYPE_CHECKING:
    from ._metrics import RecorderMetrics
    from .exporters import Exporter
    from .incident import Incident

__all__ = ["ExportWorker"]

_log = logging.getLogger(__name__)
_STOP = object()
_T = TypeVar("_T")


class ExportWorker(Generic[_T]):
    """Owns the bounded queue, the thread that builds and exports, and the exporter's lifecycle
    (its ``force_flush`` and ``shutdown`` are called from :meth:`flush` and :meth:`stop`)."""

    def __init__(self, *, exporter: Exporter, metrics: RecorderMetrics,
                 build: Callable[[_T], Incident], max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._exporter = exporter
        self._metrics = metrics
        self._build = build
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._cv = threading.Condition()
        self._outstanding = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="forensics-export", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        """Items waiting in the queue."""
        return self._q.qsize()

    def submit(self, incident_id: str, item: _T) -> str | None:
        """Queue without blocking; returns ``incident_id``, or None if dropped (counted)."""
        if self._closed:
            self._metrics.dropped("shutdown")
            return None
        with self._cv:
            self._outstanding += 1
        try:
            self._q.put_nowait((incident_id, item))
        except queue.Full:
            self._done()
            self._metrics.dropped("queue_full")
            return None
        self._metrics.queue_depth.set(self._q.qsize())
        return incident_id

    def _done(self) -> None:
        with self._cv:
            self._outstanding -= 1
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            entry = self._q.get()
            if entry is _STOP:
                return
            incident_id, item = entry
            try:
                self._process(incident_id, item)
            except Exception:
                _log.exception("forensics: building/exporting incident %s failed", incident_id)
                self._metrics.dropped("capture_error")
            finally:
                self._metrics.queue_depth.set(self._q.qsize())
                self._done()

    def _process(self, incident_id: str, item: _T) -> None:
        try:
            incident = self._build(item)
        except IncidentTooLargeError as e:
            _log.warning("forensics: incident %s dropped: %s", incident_id, e)
            self._metrics.dropped("too_large")
            return
        ex = self._exporter
        if ex.export(incident) is ExportResult.SUCCESS:
            self._metrics.exported()
        elif not getattr(ex, "counts_own_drops", False):
            # exporters that count their own drops by reason (spool_full, ...) already did
            self._metrics.dropped("export_failed")

    def flush(self, *, timeout_s: float) -> bool:
        """Wait until every submitted item was exported or dropped, then flush the exporter;
        False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._outstanding > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        try:
            return bool(self._exporter.force_flush(max(0.0, deadline - time.monotonic())))
        except Exception:
            _log.exception("forensics: exporter.force_flush failed")
            return False

    def stop(self, *, timeout_s: float) -> None:
        """Flush for up to ``timeout_s``, count what is still queued as dropped (``shutdown``),
        stop the thread and shut the exporter down. Idempotent."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s=timeout_s)
        self._closed = True
        left = 0
        while True:
            try:
                entry = self._q.get_nowait()
            except queue.Empty:
                break
            if entry is not _STOP:
                left += 1
                self._done()
        if left:
            self._metrics.dropped("shutdown", left)
        self._q.put(_STOP)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self._exporter.shutdown(max(0.0, deadline - time.monotonic()))
        except Exception:
            _log.exception("forensics: exporter.shutdown failed")
