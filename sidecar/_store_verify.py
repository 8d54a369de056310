"""Post-ack verification: an acknowledged incident's content digest checked against its rows.

With the CRC32C ingest protocol (DESIGN §10) the sidecar acknowledges an upload once the file is
validated (structure, schema, decoded size), durable and indexed; the sha256 over every row —
the incident's own digest, computed by the middleware when it built the incident — is checked
here, on a background thread, after the ack. The same read computes the file's sha256 (the
index's ``sha256``, announced by ``DownloadIncident``). A row stays ``integrity = 'pending'``
until then; a mismatch (bytes that passed the CRC32C but are not what the middleware built: a
middleware bug or corruption before the CRC was taken) moves the file to ``<root>/quarantine/``
(``quarantine/<tenant dir>/``; the same prefix of ``store.uri`` for an object store) with a
reason file, removes the index row and receipt, and counts
``forensics_incidents_quarantined_total{reason}``. Pending rows left by a crash are queued
again at start-up (:meth:`ContentVerifier.resume`).

Example::

    verifier = ContentVerifier(store)
    verifier.submit("inc-1", tenant="acme")   # after the ack (ids are unique per tenant)
    verifier.wait_idle(timeout_s=10)          # tests and benchmarks
    verifier.verify("inc-2", tenant="acme")   # now, on this thread ("verified" | ...)
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from integrations.errors import IncidentFormatError

from ._observer import Telemetry, counter

if TYPE_CHECKING:
    from integrations.incident import DecodeLimits

    from ._catalog import Catalog
    from ._incident_files import IncidentFiles

__all__ = ["INCIDENTS_QUARANTINED", "METRICS", "QUARANTINE_REASONS", "ContentVerifier",
           "file_sha256"]

log = logging.getLogger("sidecar.verify")

#: Why an acknowledged incident was quarantined (label values; bounded).
QUARANTINE_REASONS = ("content_digest_mismatch", "invalid_incident")
INCIDENTS_QUARANTINED = counter(
    "incidents_quarantined", "Acknowledged incidents whose content failed the post-ack check "
    "(moved to <data_dir>/quarantine/), by reason.", labels=("reason",),
    values={"reason": QUARANTINE_REASONS})
METRICS = (INCIDENTS_QUARANTINED,)

_BLOCK = 4 * 1024 * 1024


def file_sha256(path: os.PathLike[str] | str) -> str:
    """The sha256 (hex) of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _checked_digest(path: os.PathLike[str], store: _Store) -> object:
    """The manifest's digest of the file at ``path`` after ``Incident.open`` recomputed it over
    every row (raises :class:`IncidentFormatError` when they differ)."""
    from integrations.incident import Incident

    inc = Incident.open(path, verify=True, limits=store.decode_limits)
    return (inc.manifest.get("integrity") or {}).get("sha256")


class _Store(Protocol):
    """What the checker needs of :class:`~sidecar._store.LocalStore`."""

    index: Catalog
    files: IncidentFiles
    decode_limits: DecodeLimits | None
    telemetry: Telemetry
    _put_lock: Any

    def path(self, incident_id: str, *, tenant: str | None = None) -> Path: ...


class ContentVerifier:
    """The store's post-ack checker: one daemon thread, started on the first :meth:`submit`."""

    def __init__(self, store: _Store) -> None:
        self.store = store
        self._q: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._lock = threading.Lock()        # one verification at a time (thread or caller)
        self._idle = threading.Condition()
        self._outstanding = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, incident_id: str, *, tenant: str) -> None:
        """Queue (``tenant``, ``incident_id``) for checking (returns at once)."""
        with self._idle:
            if self._closed:
                return
            self._outstanding += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="forensics-verify",
                                                daemon=True)
                self._thread.start()
        self._q.put((tenant, incident_id))

    def resume(self) -> int:
        """Queue every row still pending (after a restart); how many."""
        keys = self.store.index.pending_keys()
        for tenant, incident_id in keys:
            self.submit(incident_id, tenant=tenant)
        return len(keys)

    def _run(self) -> None:
        while (key := self._q.get()) is not None:
            tenant, incident_id = key
            try:
                if not self._closed:
                    self.verify(incident_id, tenant=tenant)
            except Exception:   # an I/O error: the row stays pending, retried at next start
                log.exception("post-ack verification of %s failed", incident_id)
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()

    def verify(self, incident_id: str, *, tenant: str) -> str:
        """Check one incident of ``tenant`` now: ``"verified"``, ``"quarantined"``, or its
        state when it was not pending (``"verified"``) or is gone (``"absent"``)."""
        with self._lock:
            row = self.store.index.get_incident(incident_id, tenant=tenant)
            if row is None:
                return "absent"
            if row.integrity != "pending":
                return row.integrity
            path = self.store.path(incident_id, tenant=tenant)
            try:
                claimed = _checked_digest(path, self.store)
            except FileNotFoundError:
                return "absent"
            except IncidentFormatError as e:
                reason = ("content_digest_mismatch" if "integrity check failed" in str(e)
                          else "invalid_incident")
                self._quarantine(incident_id, tenant, reason, str(e))
                return "quarantined"
            if claimed != row.content_sha256:
                self._quarantine(incident_id, tenant, "content_digest_mismatch",
                                 f"manifest digest {claimed} ≠ acknowledged {row.content_sha256}")
                return "quarantined"
            self.store.index.mark_verified(incident_id, file_sha256(path), tenant=tenant)
            return "verified"

    def _quarantine(self, incident_id: str, tenant: str, reason: str, detail: str) -> None:
        store = self.store
        with store._put_lock:
            store.files.quarantine(tenant, incident_id, reason=reason, detail=detail)
            store.index.delete_incident(incident_id, tenant=tenant)
        store.telemetry.observe(INCIDENTS_QUARANTINED, labels={"reason": reason})

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until nothing is queued or being checked; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout=timeout_s)

    def close(self) -> None:
        """Stop the thread after the incident being checked (pending ones resume next start)."""
        with self._idle:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._q.put(None)
            thread.join(timeout=30)
