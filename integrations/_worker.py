"""The recorder's export worker: a bounded queue drained by one background thread.

Like OpenTelemetry's ``BatchSpanProcessor``: the serving thread only ever calls
:meth:`ExportWorker.submit` (``put_nowait``; a full queue is a counted drop, never a wait). The
worker thread builds the Arrow incident (manifest, weight fingerprint, size cap) and hands it to
the exporter. Every submitted incident ends as exported or dropped-with-reason.

Example::

    w = ExportWorker(recorder=rec, max_queue=64, compression_ratio=1.0)
    w.start(); w.submit(pending); w.flush(timeout_s=5); w.stop(timeout_s=5)
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._recorder import Recorder
    from ._request import RequestState, _Row
    from .triggers import Fire

__all__ = ["ExportWorker", "PendingIncident"]

_log = logging.getLogger(__name__)
_STOP = object()


@dataclass
class PendingIncident:
    """A finished request waiting to be built into an incident and exported."""

    state: RequestState
    fire: Fire
    rows: list[_Row]
    activations: str          # "captured" | "replay"
    last_step: int
    incident_id: str = ""


class ExportWorker:
    """Owns the bounded queue and the thread that builds and exports incidents."""

    def __init__(self, *, recorder: Recorder, max_queue: int, compression_ratio: float) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._rec = recorder
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._compression = "zstd" if compression_ratio < 1.0 else None
        self._cv = threading.Condition()
        self._outstanding = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._fingerprint: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="forensics-export", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        return self._q.qsize()

    def submit(self, p: PendingIncident) -> str | None:
        """Queue without blocking; returns the incident id, or None if dropped (counted)."""
        if self._closed:
            self._rec.metrics.dropped("shutdown")
            return None
        p.incident_id = p.state.incident_id or uuid.uuid4().hex
        with self._cv:
            self._outstanding += 1
        try:
            self._q.put_nowait(p)
        except queue.Full:
            self._done()
            self._rec.metrics.dropped("queue_full")
            return None
        self._rec.metrics.queue_depth.set(self._q.qsize())
        return p.incident_id

    def _done(self) -> None:
        with self._cv:
            self._outstanding -= 1
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            try:
                self._process(item)
            except Exception:
                _log.exception("forensics: building/exporting incident %s failed",
                               item.incident_id)
                self._rec.metrics.dropped("capture_error")
            finally:
                self._rec.metrics.queue_depth.set(self._q.qsize())
                self._done()

    def _process(self, p: PendingIncident) -> None:
        from .errors import IncidentTooLargeError
        from .exporters import ExportResult
        from .incident import Incident, IncidentBuilder

        manifest = self._manifest(p)
        b = IncidentBuilder(manifest=manifest)
        for r in p.rows:
            b.add(kind=r.kind, site=r.site, module_path=r.module_path, step=r.step,
                  tensor=r.tensor, copy=False)  # rows are already private copies
        st = p.state
        if st.output_ids is not None:
            b.add(kind="output", site="output_ids", module_path="", step=p.last_step,
                  tensor=st.output_ids)
        if st.rng_state is not None:
            b.add(kind="reference", site="rng.cpu", module_path="", step=0,
                  tensor=st.rng_state)
        try:
            data = b.to_buffer(max_bytes=self._rec.max_bundle_bytes,
                               compression=self._compression)
        except IncidentTooLargeError as e:
            _log.warning("forensics: incident %s dropped: %s", p.incident_id, e)
            self._rec.metrics.dropped("too_large")
            return
        incident = Incident.from_bytes(data, verify=False)  # just built and digested here
        p.rows.clear()  # release the copies early
        ex = self._rec.exporter
        if ex.export(incident) is ExportResult.SUCCESS:
            self._rec.metrics.exported()
        elif not getattr(ex, "counts_own_drops", False):
            # exporters that count their own drops by reason (spool_full, ...) already did
            self._rec.metrics.dropped("export_failed")

    def _manifest(self, p: PendingIncident) -> dict[str, Any]:
        from .incident import FORMAT_VERSION, model_fingerprint, runtime_info

        rec, st = self._rec, p.state
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(rec.model)
        tok = rec.tokenizer
        content: dict[str, Any] | None = None
        if rec.capture_content:
            content = {"input_text": st.input_text, "output_text": st.output_text}
        import torch

        return {
            "format_version": FORMAT_VERSION,
            "id": p.incident_id,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "model": {**rec.model_ref, "fingerprint": self._fingerprint},
            "tokenizer": None if tok is None else {
                "name": str(getattr(tok, "name_or_path", "") or type(tok).__name__),
                "revision": None, "class": type(tok).__name__},
            # A flagged request is described by its (first) flag; the rule that decided the
            # capture (e.g. sampling) is kept as captured_by.
            "trigger": {"rule": "flag" if st.flags else p.fire.rule,
                        "reason": st.flags[0] if st.flags else p.fire.reason,
                        "step": st.flag_step if st.flag_step is not None else p.last_step,
                        "flags": list(st.flags),
                        "captured_by": {"rule": p.fire.rule, "reason": p.fire.reason}},
            "request": {"id": st.request_id, "tenant": st.tenant,
                        "traceparent": st.traceparent, "error": st.request_error,
                        "started_at": _dt.datetime.fromtimestamp(
                            st.started_at, _dt.timezone.utc).isoformat(),
                        "batch_row": None if st.rows == slice(None) else st.rows.start},
            "runtime": {**runtime_info(rec.model), "host": platform.node()},
            "generation": st.generation,
            "seeds": {"torch_initial_seed": int(torch.initial_seed()),
                      "rng_state": "reference:rng.cpu" if st.rng_state is not None else None},
            "content_captured": content is not None,
            "content": content,
            "activations": p.activations,
            "external_calls": list(st.external_calls),
            "sites": [b.site for b in rec.bound] if p.activations == "captured" else [],
            "steps": p.last_step + 1,
        }

    def flush(self, *, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._outstanding > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        try:
            return bool(self._rec.exporter.force_flush(max(0.0, deadline - time.monotonic())))
        except Exception:
            _log.exception("forensics: exporter.force_flush failed")
            return False

    def stop(self, *, timeout_s: float) -> None:
        if self._closed:
            return
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s=timeout_s)
        self._closed = True
        # Whatever is still queued after the flush timeout is dropped and counted.
        left = 0
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                left += 1
                self._done()
        if left:
            self._rec.metrics.dropped("shutdown", left)
        self._q.put(_STOP)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self._rec.exporter.shutdown(max(0.0, deadline - time.monotonic()))
        except Exception:
            _log.exception("forensics: exporter.shutdown failed")
